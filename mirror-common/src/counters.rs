//! The counters, each written once: [`counters!`] turns a list of fields (name, meaning, how the
//! metrics show it) into the kernel's struct and everything userspace does with it: sums, the
//! report's columns, log fields, metrics and JSON. Adding a counter is one line in a list.

/// How a counter shows in the agent's metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// A family of its own: `mirror_<name>_total`.
    Own(&'static str),
    /// A `reason` of `mirror_rule_copies_not_sent_total`: a copy that was not made.
    NotSent,
}

/// One counter of a counters struct: its field name, what it counts, and its metric.
#[derive(Clone, Copy, Debug)]
pub struct CounterField {
    pub name: &'static str,
    /// The field's doc comment.
    pub help: &'static str,
    pub metric: Metric,
}

impl CounterField {
    /// Whether it counts bytes rather than packets (its metric ends in `_bytes`, as Prometheus
    /// names units).
    pub fn counts_bytes(&self) -> bool {
        matches!(self.metric, Metric::Own(name) if name.ends_with("_bytes"))
    }
}

/// A `#[repr(C)]` struct of `u64` counters (no padding: all fields alike) with its field list
/// ([`CounterField`]), its values in that order, field-wise sums and setting a field by name. The
/// attributes given come first (the kernel's counters add JSON with feature `user`); the agent
/// declares the counters it keeps in userspace with it too.
#[macro_export]
macro_rules! counters {
    (@metric $name:literal) => {
        $crate::Metric::Own($name)
    };
    (@metric not_sent) => {
        $crate::Metric::NotSent
    };
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[doc = $doc:literal])+ $field:ident => $metric:tt, )+
        }
    ) => {
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        $(#[$meta])*
        pub struct $name {
            $( $(#[doc = $doc])+ pub $field: u64, )+
        }

        impl $name {
            /// The counters, in declaration order.
            pub const FIELDS: &'static [$crate::CounterField] = &[
                $( $crate::CounterField {
                    name: stringify!($field),
                    help: concat!($($doc),+),
                    metric: $crate::counters!(@metric $metric),
                }, )+
            ];

            /// The values, in the order of [`Self::FIELDS`].
            pub fn values(&self) -> impl Iterator<Item = u64> {
                [$(self.$field),+].into_iter()
            }

            /// The fields and their values.
            pub fn named(&self) -> impl Iterator<Item = (&'static $crate::CounterField, u64)> {
                Self::FIELDS.iter().zip(self.values())
            }

            /// Sets the counter named `name`; false when there is none.
            pub fn set(&mut self, name: &str, value: u64) -> bool {
                match name {
                    $( stringify!($field) => self.$field = value, )+
                    _ => return false,
                }
                true
            }
        }

        impl core::ops::AddAssign for $name {
            fn add_assign(&mut self, other: Self) {
                $( self.$field += other.$field; )+
            }
        }

        impl core::ops::Add for $name {
            type Output = Self;

            fn add(mut self, other: Self) -> Self {
                self += other;
                self
            }
        }
    };
}

counters! {
    /// Per-CPU counters of a rule or a session.
    #[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
    #[cfg_attr(feature = "user", serde(default))]
    pub struct Counters {
        /// Packets this rule or session decided (mirror or skip).
        matched => "rule_matched_packets",
        /// Bytes of the packets this rule or session decided, from their Ethernet headers on.
        matched_bytes => "rule_matched_bytes",
        /// Copies handed to the target.
        mirrored => "rule_copies",
        /// Bytes of the copies handed to the target, as cut (before a tunnel's outer headers).
        mirrored_bytes => "rule_copied_bytes",
        /// Copies the kernel failed to clone or redirect.
        clone_errors => not_sent,
        /// Copies not made because the packet already had 8 copies at this hook (more sessions
        /// than that selected it).
        copy_limit => not_sent,
        /// Copies not made because they are larger than the target carries (its MTU, or a tunnel's
        /// path MTU less the outer headers) and the session sets no snaplen.
        too_big => not_sent,
        /// Copies not made because sampling left them out.
        sampled_out => not_sent,
        /// Copies not made because the session's limit or the node's budget was spent.
        rate_limited => not_sent,
        /// Copies cut to the session's `snaplen` (also counted as sent).
        truncated => "rule_truncated_copies",
        /// Copies not made because the ring buffer was full (the agent did not drain it in time).
        ring_full => not_sent,
        /// Copies not made because the target is not there: a tunnel's collector has no route or
        /// its next hop no known MAC address, or the target interface is gone.
        no_route => not_sent,
        /// Copies for `mirror-agent capture` watchers that found the ring full (the target's
        /// copy was sent; counted in `mirrored`).
        watch_lost => "rule_watch_lost_copies",
        /// Copies decided of packets the parser could not finish (a truncated header, an IPv6
        /// extension chain longer than it follows): the fields it did not reach match any rule.
        /// Sent unless the session skips them (`unparsed = "skip"`).
        unparsed => "rule_unparsed_packets",
    }
}

impl Counters {
    /// Copies the rules selected that were not sent, for any reason.
    pub fn not_sent(&self) -> u64 {
        self.named()
            .filter(|(field, _)| field.metric == Metric::NotSent)
            .map(|(_, value)| value)
            .sum()
    }
}

counters! {
    /// Per-CPU counters of a hook (ingress, egress, XDP or the copy program), across interfaces.
    #[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
    #[cfg_attr(feature = "user", serde(default))]
    pub struct HookCounters {
        /// Packets classified at the interfaces sessions watch (the copy program: copies).
        packets => "hook_packets",
        /// Packets whose headers were truncated or malformed; the fields the parser did not reach
        /// matched any rule, and the packet always passed on unchanged.
        malformed => "hook_malformed_packets",
        /// Packets whose classification stopped at its step limit, the rules plus their words
        /// (never expected).
        step_limit => "hook_step_limit_packets",
        /// Packets met with a rule-table inconsistency (never expected; the packet still passes).
        table_errors => "hook_table_error_packets",
        /// Copy program only: copies that are not this generation's (another generation's, or a
        /// rule it does not know): passed on unchanged.
        foreign => "hook_foreign_copies",
        /// Copy program only: copies that could not be cut or given their outer headers (dropped).
        copy_errors => "hook_copy_errors",
    }
}
