#!/usr/bin/env python3
"""Renders the chart offline with Helm's own engine, as `helm template` does, and prints the
manifests (one YAML stream). No helm binary is needed: helm-python-sdk (pip) carries Helm's Go
library; `cargo xtask setup` installs it.

    deploy/helm/render.py [--namespace NS] [--release NAME] [--set-json KEY=JSON ...]
    deploy/helm/render.py --manifests > deploy/manifests/mirror.yaml
    deploy/helm/render.py --lint

`--lint` runs `helm lint --strict` instead and exits 1 on any warning or error.

`--manifests` prints the plain manifests: a Namespace, then the chart with its default values
(tests/tests/deploy.rs checks that the committed file is exactly that).
"""
import argparse
import json
import pathlib
import sys

import helm_python
import helm_python.errors

CHART = pathlib.Path(__file__).resolve().parent / "mirror"

MANIFESTS_HEADER = """\
# mirror: the agent as a DaemonSet on every node, the plain manifests. Generated from the Helm
# chart (deploy/helm/mirror) with its default values by `deploy/helm/render.py --manifests`:
# edit the chart, not this file.
#   kubectl apply -f deploy/manifests/mirror.yaml
# Then edit the ConfigMap's config.toml: the agent applies a changed file within seconds (the
# kubelet swaps the mounted file, the agent notices), or rejects it with the line and the reason
# in its log and keeps the running configuration.
apiVersion: v1
kind: Namespace
metadata:
  name: {namespace}
  labels:
    # The agent needs the node's network, host paths and capabilities beyond Pod Security's
    # `baseline`: a cluster that enforces Pod Security admits it only in a `privileged` namespace.
    pod-security.kubernetes.io/enforce: privileged
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", default="mirror")
    parser.add_argument("--release", default="mirror")
    parser.add_argument("--set-json", action="append", default=[], metavar="KEY=JSON",
                        help="a value, e.g. metrics={\"port\":9500} (repeatable)")
    parser.add_argument("--manifests", action="store_true",
                        help="the plain manifests: a Namespace, then the chart with defaults")
    parser.add_argument("--lint", action="store_true",
                        help="helm lint --strict: exit 1 on any warning or error")
    args = parser.parse_args()
    if args.lint:
        report = helm_python.lint(str(CHART), strict=True, namespace=args.namespace)
        findings = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        for message in report["messages"]:
            print(f"{message['path']}: {message['error']} (severity {message['severity']})")
        return 1 if findings else 0
    if args.manifests:
        print(MANIFESTS_HEADER.format(namespace=args.namespace), end="")
    values = {}
    for item in args.set_json:
        key, _, text = item.partition("=")
        values[key] = json.loads(text)
    chart = helm_python.Chart.load(str(CHART))
    try:
        rendered = chart.render(values, name=args.release, namespace=args.namespace,
                                is_install=True)
    except helm_python.errors.HelmError as error:
        print(f"render.py: {error}", file=sys.stderr)
        return 1
    for path in sorted(rendered):
        text = rendered[path].strip()
        if path.endswith(".yaml") and text:
            print(f"---\n# Source: {path}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
