//! `cargo xtask image`: the agent's container image, built from deploy/Dockerfile by podman or
//! docker (whichever is present), with the binary alone in the build context.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{root, run};

/// What `--base bootstrap` builds and uses: Debian bookworm by debootstrap, with libpcap (which
/// compiles the filters beyond the rule tables), for machines that reach Debian's packages but
/// no container registry.
pub const BOOTSTRAPPED_BASE: &str = "localhost/mirror-base:bookworm-libpcap";

/// The container engine: podman or docker, with the global flags it needs here.
pub struct Engine {
    program: &'static str,
}

impl Engine {
    /// podman if present, else docker.
    pub fn find() -> anyhow::Result<Engine> {
        for program in ["podman", "docker"] {
            let present = Command::new(program)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if present {
                return Ok(Engine { program });
            }
        }
        bail!("neither podman nor docker is installed (`cargo xtask setup` installs podman)")
    }

    /// A command of the engine. podman runs containers with runc: crun fails on these
    /// machines' hybrid cgroups.
    pub fn command(&self) -> Command {
        let mut command = Command::new(self.program);
        if self.program == "podman" {
            command.args(["--runtime", "runc"]);
        }
        command
    }

    fn has_image(&self, name: &str) -> bool {
        self.image_id(name).is_some()
    }

    /// The id of the image `name`, if the engine has it.
    fn image_id(&self, name: &str) -> Option<String> {
        let output = self
            .command()
            .args(["image", "inspect", "--format", "{{.Id}}", name])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

/// Builds the image `tag` from deploy/Dockerfile with `binary` on `base` (`bootstrap`: see
/// [`BOOTSTRAPPED_BASE`]; none: the Dockerfile's default).
pub fn build(binary: &Path, tag: &str, base: Option<&str>) -> anyhow::Result<()> {
    let engine = Engine::find()?;
    let base = match base {
        Some("bootstrap") => {
            bootstrap(&engine)?;
            Some(BOOTSTRAPPED_BASE)
        }
        other => other,
    };
    // Only the binary goes into the context: not the workspace's gigabytes of target/.
    let context = root().join("target/image-context");
    if context.exists() {
        std::fs::remove_dir_all(&context)
            .with_context(|| format!("removing {}", context.display()))?;
    }
    std::fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    std::fs::copy(binary, context.join("mirror-agent"))
        .with_context(|| format!("copying {}", binary.display()))?;
    let mut command = engine.command();
    command
        .args(["build", "--tag", tag, "--file"])
        .arg(root().join("deploy/Dockerfile"));
    if let Some(base) = base {
        command.args(["--build-arg", &format!("BASE={base}")]);
    }
    let replaced = engine.image_id(tag);
    run(command.arg(&context))?;
    // The image the tag named before is left without a name: remove it, unless a container
    // still uses it, so that rebuilding does not pile up images.
    if let Some(old) = replaced.filter(|old| engine.image_id(tag).as_ref() != Some(old)) {
        let _ = engine
            .command()
            .args(["rmi", &old])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    eprintln!("xtask: built {tag}");
    Ok(())
}

/// Makes [`BOOTSTRAPPED_BASE`] unless the engine has it: a minimal Debian bookworm root with
/// libpcap by debootstrap, without documentation, manuals, locales and apt's lists, imported as an image.
fn bootstrap(engine: &Engine) -> anyhow::Result<()> {
    if engine.has_image(BOOTSTRAPPED_BASE) {
        eprintln!("xtask: {BOOTSTRAPPED_BASE} present");
        return Ok(());
    }
    let dir = tempfile::tempdir().context("a directory for debootstrap")?;
    let rootfs: PathBuf = dir.path().join("bookworm");
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=libpcap0.8", "bookworm"])
        .arg(&rootfs))?;
    for unneeded in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
        "var/cache/apt",
        "var/lib/apt/lists",
    ] {
        let path = rootfs.join(unneeded);
        std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting tar")?;
    let stream = tar.stdout.take().context("tar's output")?;
    run(engine
        .command()
        .args(["import", "-", BOOTSTRAPPED_BASE])
        .stdin(stream))?;
    if !tar.wait().context("tar")?.success() {
        bail!("tar of {} failed", rootfs.display());
    }
    Ok(())
}
