//! The configuration file (TOML): sessions, their interfaces, direction, target and ordered rules.
//! Parsing checks form and values; every error names the file, line and column of the culprit.
//! Each kind of target's keys are its own (see `crate::targets`).
use std::{fmt, path::Path};

use serde::Deserialize;
use toml::Spanned;

use crate::targets::TargetConfig;
pub use crate::values::{Cidr, Ethertype, IpProto, PortRange, Vlan};

/// A configuration error with its place in the file, and the others the same pass found.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub location: Location,
    pub message: String,
    /// Further errors of the file, one line each after this one.
    pub also: Vec<ConfigError>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)?;
        self.also
            .iter()
            .try_for_each(|error| write!(f, "\n{error}"))
    }
}

impl ConfigError {
    /// The errors of one pass over a file as one error, in the order found; `Ok` when there is
    /// none.
    pub fn gather(errors: Vec<ConfigError>) -> Result<(), ConfigError> {
        let mut errors = errors.into_iter().flat_map(|mut error| {
            let also = std::mem::take(&mut error.also);
            std::iter::once(error).chain(also)
        });
        let Some(mut first) = errors.next() else {
            return Ok(());
        };
        first.also.extend(errors);
        Err(first)
    }
}

/// `file:line:column`, or just the file when the place is unknown.
#[derive(Debug, Clone)]
pub struct Location {
    pub file: String,
    pub line_col: Option<(usize, usize)>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line_col {
            Some((line, col)) => write!(f, "{}:{line}:{col}", self.file),
            None => write!(f, "{}", self.file),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Sessions, in priority order: copies are made in this order.
    #[serde(default, rename = "session")]
    pub sessions: Vec<Spanned<SessionConfig>>,
    /// Seconds between counter log lines (0: never).
    #[serde(default = "default_stats_interval")]
    pub stats_interval_secs: u64,
    /// A budget all sessions' copies share, on top of their own limits.
    pub node_rate_limit: Option<Spanned<RateLimitConfig>>,
    /// The API's Unix socket (`mirror-agent status`, `stats`).
    pub api_socket: Option<std::path::PathBuf>,
    /// Where to serve Prometheus `/metrics`, `/healthz` and `/readyz` (none by default).
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Whether the metrics address serves the read-only JSON routes too (`/status`, `/stats`,
    /// `/stats/stream`): they name pods, addresses, interfaces and collectors, and ask for no
    /// credentials, so they are off unless asked for.
    #[serde(default)]
    pub metrics_json_routes: bool,
    /// Pinned mode: a bpffs directory where programs and links outlive the agent (none by
    /// default: everything is detached on exit).
    pub pin_dir: Option<std::path::PathBuf>,
    /// Bytes of the ring buffer that carries XDP and pcap copies to the agent: a power of two, at
    /// least 4096 (default 8 MiB). A full ring drops copies (counted as `ring_full`).
    pub copy_ring_bytes: Option<Spanned<u32>>,
}

/// The default [`Config::copy_ring_bytes`].
pub const DEFAULT_COPY_RING_BYTES: u32 = 8 << 20;

fn default_stats_interval() -> u64 {
    10
}

/// One mirroring session.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    pub name: Spanned<String>,
    /// Interface names or globs (`veth*`) whose packets are examined.
    pub interfaces: Option<Spanned<Vec<Spanned<String>>>>,
    /// Instead of `interfaces`: the pods of this node that match, watched through their
    /// host-side interfaces, followed as pods come, change labels and go (Kubernetes).
    pub pods: Option<Spanned<PodSelector>>,
    /// Default: both for TC, ingress (the only side XDP sees) for XDP.
    pub direction: Option<Spanned<DirectionConfig>>,
    /// Where packets are examined: `tc` (default; copies are clones) or `xdp` (before the
    /// kernel's stack; copies go through the ring buffer and the agent sends them on).
    pub hook: Option<Spanned<HookConfig>>,
    /// Where the copies go; left out, the session is observed only (it needs `observe`).
    #[serde(
        default = "crate::targets::no_target",
        deserialize_with = "crate::targets::one_kind"
    )]
    pub target: Spanned<TargetConfig>,
    /// `"http"`: the HTTP/1.x exchanges in the copies of both directions are counted by service
    /// (requests, status classes, durations), with a shadow target or with none.
    pub observe: Option<Spanned<crate::targets::observe::ObserveConfig>>,
    /// What happens to packets no rule matches (default: skip).
    pub default: Option<Spanned<ActionConfig>>,
    /// A tcpdump filter expression (`tcp port 443 and not host 10.1.2.3`) instead of rules:
    /// compiled into ordered rules, or what the rules cannot hold into one rule running
    /// libpcap's program; `check --explain` shows them.
    pub filter: Option<Spanned<String>>,
    /// Copies are cut to this many bytes (from the Ethernet header); the original is untouched.
    pub snaplen: Option<Spanned<u32>>,
    /// Copy only a sample of what the rules select.
    pub sample: Option<Spanned<SampleConfig>>,
    /// At most this many copies (and bytes of copies) per second.
    pub rate_limit: Option<Spanned<RateLimitConfig>>,
    /// Packets the parser cannot finish (a truncated header, an IPv6 extension chain longer than
    /// it follows): `mirror` (the default) copies them when a rule might match, since the fields
    /// it did not reach could match anything; `skip` never copies them. Counted as `unparsed`.
    pub unparsed: Option<ActionConfig>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<Spanned<RuleConfig>>,
}

impl SessionConfig {
    /// Where the session says what it watches, for errors about it.
    pub fn watch_span(&self) -> std::ops::Range<usize> {
        match (&self.interfaces, &self.pods) {
            (Some(interfaces), _) => interfaces.span(),
            (None, Some(pods)) => pods.span(),
            (None, None) => self.name.span(),
        }
    }
}

/// `pods = { namespace = "shop", labels = { app = "web" } }`: pods of this node by namespace and
/// labels, as a Kubernetes label selector: every label and every expression must hold.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct PodSelector {
    /// Only pods of this namespace (default: every namespace).
    pub namespace: Option<String>,
    /// Pods carrying every one of these labels with these values (`matchLabels`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Set-based requirements (`matchExpressions`):
    /// `[{ key = "tier", operator = "In", values = ["front", "edge"] }]`.
    #[serde(default)]
    pub expressions: Vec<LabelExpression>,
}

/// One requirement on a label.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct LabelExpression {
    pub key: String,
    pub operator: LabelOperator,
    /// For `In` and `NotIn` (at least one); none for `Exists` and `DoesNotExist`.
    #[serde(default)]
    pub values: Vec<String>,
}

/// The operators of Kubernetes label selectors.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LabelOperator {
    /// The label is there, with one of the values.
    In,
    /// The label is missing, or has none of the values.
    NotIn,
    /// The label is there, with any value.
    Exists,
    /// The label is missing.
    DoesNotExist,
}

impl LabelExpression {
    fn holds(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            LabelOperator::In => value.is_some_and(|v| self.values.contains(v)),
            LabelOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            LabelOperator::Exists => value.is_some(),
            LabelOperator::DoesNotExist => value.is_none(),
        }
    }

    /// What is wrong with the expression's values for its operator, if anything.
    pub fn problem(&self) -> Option<String> {
        match (self.operator, self.values.is_empty()) {
            (LabelOperator::In | LabelOperator::NotIn, true) => Some(format!(
                "`{:?}` on label `{}` needs at least one value",
                self.operator, self.key
            )),
            (LabelOperator::Exists | LabelOperator::DoesNotExist, false) => Some(format!(
                "`{:?}` on label `{}` takes no values",
                self.operator, self.key
            )),
            _ => None,
        }
    }
}

impl PodSelector {
    pub fn matches(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self
                .labels
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
            && self.expressions.iter().all(|e| e.holds(labels))
    }
}

impl fmt::Display for PodSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut requirements: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        requirements.extend(self.expressions.iter().map(|e| match e.operator {
            LabelOperator::In => format!("{} in ({})", e.key, e.values.join(",")),
            LabelOperator::NotIn => format!("{} notin ({})", e.key, e.values.join(",")),
            LabelOperator::Exists => e.key.clone(),
            LabelOperator::DoesNotExist => format!("!{}", e.key),
        }));
        write!(
            f,
            "pods in {} selected by {}",
            self.namespace.as_deref().unwrap_or("any namespace"),
            if requirements.is_empty() {
                "nothing (all)".to_owned()
            } else {
                requirements.join(",")
            }
        )
    }
}

/// `sample = { every = 100, by = "flow" }`.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    /// Keep 1 in this many.
    pub every: u32,
    #[serde(default)]
    pub by: SampleBy,
    /// Mixed into the flow hash (`by = "flow"`): agents with the same seed sample the same flows.
    /// Default: chosen at random when the agent starts.
    pub seed: Option<u32>,
}

/// What sampling picks.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SampleBy {
    /// Each packet independently, at random.
    #[default]
    Packet,
    /// Whole flows (both directions), by a hash of addresses, ports and protocol.
    Flow,
}

/// `rate_limit = { packets_per_second = 1000, bytes_per_second = 10_000_000 }`; bursts default to
/// a tenth of a second's worth (at least one packet, and 64 KiB).
#[derive(Debug, Deserialize, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub packets_per_second: Option<u64>,
    pub bytes_per_second: Option<u64>,
    pub burst_packets: Option<u64>,
    pub burst_bytes: Option<u64>,
}

/// Which side of the interfaces to watch.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DirectionConfig {
    /// Received packets (tcpdump's `-Q in`).
    #[value(alias = "in")]
    Ingress,
    /// Sent packets (`-Q out`).
    #[value(alias = "out")]
    Egress,
    /// Both (`-Q inout`).
    #[default]
    #[value(alias = "inout")]
    Both,
}

/// Where a session's packets are examined.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HookConfig {
    /// TC (ingress and egress): copies are clones made in the kernel.
    #[default]
    Tc,
    /// XDP (received packets, before the kernel's stack): copies go through the ring buffer.
    Xdp,
}

/// What a rule does.
#[derive(Debug, Default, Deserialize, serde::Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ActionConfig {
    Mirror,
    #[default]
    Skip,
}

/// One rule; absent fields match anything.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Order within the session: lower numbers are tried first; unique per session.
    pub number: u32,
    pub action: ActionConfig,
    pub ethertype: Option<Ethertype>,
    pub vlan: Option<Vlan>,
    pub proto: Option<IpProto>,
    pub src: Option<Cidr>,
    pub dst: Option<Cidr>,
    /// Source or destination prefix: tcpdump's `host`/`net` (also spelled `net`; the rule stands
    /// for one rule per direction, in its place).
    #[serde(alias = "net")]
    pub host: Option<Cidr>,
    pub src_port: Option<PortRange>,
    pub dst_port: Option<PortRange>,
    /// Source or destination port or range: tcpdump's `port`/`portrange`.
    pub port: Option<PortRange>,
}

/// The largest configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// A parsed file with what is needed to point at its lines.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    pub file: String,
    text: String,
}

impl LoadedConfig {
    /// Reads and parses a file of at most [`MAX_CONFIG_BYTES`] (read no further).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read as _;
        let file = path.display().to_string();
        let error = |message: String| ConfigError {
            location: Location {
                file: file.clone(),
                line_col: None,
            },
            message,
            also: Vec::new(),
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| error(format!("cannot read: {e}")))?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(error(format!(
                "more than {} MiB: a configuration is smaller (16,384 rules take about 2 MiB)",
                MAX_CONFIG_BYTES >> 20
            )));
        }
        Self::parse(file, text)
    }

    /// Parses text that came from `file`. A file that does not parse is read again for every
    /// error it has: its syntax errors, or else the top level's and each session's on their own
    /// (serde stops at the first).
    pub fn parse(file: String, text: String) -> Result<Self, ConfigError> {
        let first = match toml::from_str::<Config>(&text) {
            Ok(config) => return Ok(Self { config, file, text }),
            Err(e) => e,
        };
        let error = |e: &toml::de::Error| {
            let span = e.span();
            ConfigError {
                location: Location {
                    file: file.clone(),
                    line_col: span.clone().map(|span| line_col(&text, span.start)),
                },
                message: in_words(e.message(), span.map(|span| (text.as_str(), span))),
                also: Vec::new(),
            }
        };
        let mut errors: Vec<ConfigError> = every_error(&text).iter().map(error).collect();
        errors.sort_by_key(|error| error.location.line_col);
        // Should no part fail on its own, the whole file's error stands.
        Err(ConfigError::gather(errors)
            .err()
            .unwrap_or_else(|| error(&first)))
    }

    /// A configuration built in memory (the CLI's quick form): errors point at the command line.
    pub fn from_config(config: Config, origin: &str) -> Self {
        Self {
            config,
            file: origin.to_owned(),
            text: String::new(),
        }
    }

    /// Whether `other` was read from the same text (a reload of an unchanged file).
    pub fn same_text(&self, other: &LoadedConfig) -> bool {
        !self.text.is_empty() && self.text == other.text
    }

    /// The place of a byte span of the file.
    pub fn location(&self, span: std::ops::Range<usize>) -> Location {
        Location {
            file: self.file.clone(),
            line_col: (!self.text.is_empty()).then(|| line_col(&self.text, span.start)),
        }
    }

    /// An error about the file as a whole.
    pub fn file_error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            location: Location {
                file: self.file.clone(),
                line_col: None,
            },
            message: message.into(),
            also: Vec::new(),
        }
    }

    /// An error at a byte span of the file.
    pub fn error(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            location: self.location(span),
            message: message.into(),
            also: Vec::new(),
        }
    }
}

/// The errors of a file that does not parse, each part on its own: the syntax errors, or else
/// the top level's (without its sessions), each session's (without its rules) and each rule's.
fn every_error(text: &str) -> Vec<toml::de::Error> {
    let (document, syntax) = toml::de::DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        return syntax;
    }
    let mut errors = Vec::new();
    for session in errors_apart::<Config>(document, "session", &mut errors) {
        let Some(table) = session.get_ref().as_table() else {
            continue;
        };
        let table = Spanned::new(session.span(), table.clone());
        for rule in errors_apart::<SessionConfig>(table, "rule", &mut errors) {
            errors.extend(RuleConfig::deserialize(toml::de::ValueDeserializer::from(rule)).err());
        }
    }
    errors
}

/// Deserializes `table` as a `T` without its list `key`, adding the error, if any, to `errors`;
/// the list's items, for their own checks.
fn errors_apart<'i, T: serde::de::DeserializeOwned>(
    table: Spanned<toml::de::DeTable<'i>>,
    key: &str,
    errors: &mut Vec<toml::de::Error>,
) -> Vec<Spanned<toml::de::DeValue<'i>>> {
    let span = table.span();
    let mut table = table.into_inner();
    let found = table
        .iter()
        .map(|(k, _)| k)
        .find(|k| k.get_ref() == key)
        .cloned();
    let items = found.and_then(|found| table.remove(&found));
    errors.extend(T::deserialize(toml::de::Deserializer::from(Spanned::new(span, table))).err());
    match items.map(Spanned::into_inner) {
        Some(toml::de::DeValue::Array(items)) => items.into_iter().collect(),
        // Not a list: the whole file's parse said so.
        _ => Vec::new(),
    }
}

/// serde's words for the types a key takes, in the words of the file's reader.
const EXPECTED: &[(&str, &str)] = &[
    ("u8", "a whole number from 0 to 255"),
    ("u16", "a whole number from 0 to 65535"),
    ("u32", "a whole number from 0 to 4294967295"),
    ("u64", "a whole number from 0 up"),
    ("i64", "a whole number"),
    ("a boolean", "true or false"),
    ("a sequence", "a list, `[…]`"),
];

/// A parse error's message with the key it is about (the key at `span`, or the key whose value
/// is there) and the expected type in words: "`snaplen`: invalid type: string \"big\", expected
/// a whole number from 0 to 4294967295".
fn in_words(message: &str, at: Option<(&str, std::ops::Range<usize>)>) -> String {
    let mut message = EXPECTED
        .iter()
        .fold(message.to_owned(), |message, (code, words)| {
            message.replace(&format!("expected {code}"), &format!("expected {words}"))
        });
    let Some((text, span)) = at else {
        return message;
    };
    let here = text.get(span.clone()).unwrap_or("").trim();
    if message == "duplicate key" {
        let _ = std::fmt::Write::write_fmt(&mut message, format_args!(" `{here}`"));
        return message;
    }
    // The key whose value starts at the span: `key = value`, also inside an inline table.
    let line_start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |at| at + 1);
    let key = text[line_start..span.start.min(text.len())]
        .trim_end()
        .strip_suffix('=')
        .and_then(|before| {
            before
                .trim_end()
                .rsplit(|c: char| c == '{' || c == ',' || c.is_whitespace())
                .next()
        })
        .filter(|key| !key.is_empty() && !message.contains(&format!("`{key}`")));
    match key {
        Some(key) => format!("`{key}`: {message}"),
        None => message,
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::{ErspanSessionId, Vni};

    fn parse(text: &str) -> Result<LoadedConfig, ConfigError> {
        LoadedConfig::parse("t.toml".into(), text.into())
    }

    #[test]
    fn parses_a_full_session() {
        let loaded = parse(
            r#"
[[session]]
name = "web"
interfaces = ["eth0", "veth*"]
direction = "ingress"
target = { interface = "mirror0" }
default = "mirror"

[[session.rule]]
number = 10
action = "skip"
ethertype = "ipv4"
vlan = 100
proto = "tcp"
src = "10.0.0.0/8"
dst = "fd00::/64"
src_port = "1024-65535"
dst_port = 443
"#,
        )
        .expect("valid");
        let session = &loaded.config.sessions[0].get_ref();
        assert_eq!(
            session.direction.as_ref().map(|d| *d.get_ref()),
            Some(DirectionConfig::Ingress)
        );
        assert_eq!(
            session.default.as_ref().map(|d| *d.get_ref()),
            Some(ActionConfig::Mirror)
        );
        let rule = session.rules[0].get_ref();
        assert_eq!(rule.ethertype, Some(Ethertype(0x0800)));
        assert_eq!(rule.vlan, Some(Vlan(100)));
        assert_eq!(rule.proto, Some(IpProto(6)));
        assert_eq!(rule.src_port, Some(PortRange(1024..=65535)));
        assert_eq!(rule.dst_port, Some(PortRange(443..=443)));
        assert_eq!(rule.dst.map(|c| c.0.to_string()), Some("fd00::/64".into()));
    }

    #[test]
    fn errors_point_at_the_line() {
        let cases = [
            (
                "[[session]]\nname = \"a\"\nbogus = 1\n",
                3,
                "unknown field `bogus`",
            ),
            (
                "[[session]]\nname=\"a\"\ninterfaces=[\"x\"]\ntarget={interface=\"m\"}\n[[session.rule]]\nnumber=1\naction=\"mirror\"\ndst_port=\"9-2\"\n",
                8,
                "not a port or port range",
            ),
            (
                "[[session]]\nname=\"a\"\ninterfaces=[\"x\"]\ntarget={interface=\"m\"}\n[[session.rule]]\nnumber=1\naction=\"mirror\"\nsrc=\"10.0.0.1/8\"\n",
                8,
                "did you mean `10.0.0.0/8`",
            ),
            (
                "[[session]]\nname=\"a\"\ninterfaces=[\"x\"]\ntarget={interface=\"m\"}\n[[session.rule]]\nnumber=1\naction=\"copy\"\n",
                7,
                "unknown variant `copy`",
            ),
            (
                "[[session]]\nname=\"a\"\ninterfaces=[\"x\"]\ntarget={interface=\"m\"}\n[[session.rule]]\nnumber=1\naction=\"mirror\"\nvlan=4096\n",
                8,
                "not a VLAN id",
            ),
            (
                "[[session]]\nname=\"a\"\ninterfaces=[\"x\"]\ntarget={interface=\"m\"}\n[[session.rule]]\nnumber=1\naction=\"mirror\"\nproto=\"tcpp\"\n",
                8,
                "not an IP protocol",
            ),
        ];
        for (text, line, message) in cases {
            let err = parse(text).expect_err(text);
            assert_eq!(err.location.line_col.map(|l| l.0), Some(line), "{err}");
            assert!(err.message.contains(message), "{err}");
            assert!(
                err.to_string().starts_with(&format!("t.toml:{line}:")),
                "{err}"
            );
        }
    }

    #[test]
    fn shipped_examples_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("examples/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let loaded = LoadedConfig::read(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(!loaded.config.sessions.is_empty(), "{}", path.display());
                seen += 1;
            }
        }
        assert!(seen >= 2, "examples found: {seen}");
    }

    #[test]
    fn value_forms() {
        assert_eq!("0x88cc".parse::<Ethertype>(), Ok(Ethertype(0x88cc)));
        assert_eq!("2054".parse::<Ethertype>(), Ok(Ethertype(0x0806)));
        assert!("0x10000".parse::<Ethertype>().is_err());
        assert_eq!("10.1.2.3".parse::<Cidr>().map(|c| c.0.prefix_len()), Ok(32));
        assert_eq!("fd00::1".parse::<Cidr>().map(|c| c.0.prefix_len()), Ok(128));
        assert_eq!("0-65535".parse::<PortRange>(), Ok(PortRange(0..=65535)));
        assert!("65536".parse::<PortRange>().is_err());
        assert!("".parse::<PortRange>().is_err());
        assert_eq!("0xffffff".parse::<Vni>(), Ok(Vni(0x00ff_ffff)));
        assert!("16777216".parse::<Vni>().is_err());
        assert_eq!("1023".parse::<ErspanSessionId>(), Ok(ErspanSessionId(1023)));
        assert!("1024".parse::<ErspanSessionId>().is_err());
    }
}
