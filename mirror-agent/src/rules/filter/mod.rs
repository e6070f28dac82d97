//! Filters as tcpdump users write them. The pcap-filter subset that maps onto rule fields is
//! compiled into ordered rules for the kernel's classifier ([`compile_tables`]); the rest of the
//! language becomes a filter program by libpcap's compiler ([`program`]), which one rule carries.
//! The same expansion turns a rule's either-direction fields (`host`, `net`, `port`) into one rule
//! per direction ([`expand`]).
//!
//! The rule tables' semantics follow tcpdump on a live Linux interface: the kernel holds the outer
//! VLAN tag aside, so `tcp` also matches tagged frames and `vlan N` tells them apart. A program
//! reads the frame as a capture file holds it, tag in place, as `tcpdump -r` does.
mod decide;
mod lex;
mod parse;
mod program;

use std::sync::Arc;

pub use self::{parse::Expr, program::Program};
use crate::{
    config::ActionConfig,
    rules::{Fields, Header},
};

/// The most rules one expression may become.
pub const MAX_FILTER_RULES: usize = 256;

/// What the error messages list as supported.
pub const SUPPORTED: &str = "supported: host, net (CIDR or `mask`), port, portrange, each with \
    src, dst, `src or dst`, `src and dst`; ip, ip6, arp, tcp, udp, sctp, icmp, icmp6, igmp, igrp, \
     pim, vrrp, vlan [N], \
    ether proto, proto, ip proto, ip6 proto; and (&&), or (||), not (!), parentheses";

/// Where an expression is wrong and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {}: {message}", offset + 1)]
pub struct FilterError {
    /// Byte offset in the expression.
    pub offset: usize,
    pub message: String,
}

impl FilterError {
    fn at(offset: usize, message: impl Into<String>) -> Self {
        FilterError {
            offset,
            message: message.into(),
        }
    }
}

/// An expression as ordered rules with first-match semantics, and the action for packets none
/// of them matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub rules: Vec<(Fields, ActionConfig)>,
    pub default: ActionConfig,
    /// For an expression beyond the rule tables: the program its one rule also needs to accept
    /// the packet.
    pub program: Option<Arc<Program>>,
}

impl Filter {
    /// Whether `frame` passes: the first rule it matches decides, else the default (what the
    /// kernel does with the same rules).
    pub fn selects(&self, frame: &[u8]) -> bool {
        let header = Header::of_frame(frame);
        let programs_accept = || {
            self.program
                .as_ref()
                .is_none_or(|p| mirror_common::cbpf::run_program(&p.insns, frame))
        };
        let action = self
            .rules
            .iter()
            .find(|(fields, _)| fields.matches(&header) && programs_accept())
            .map_or(self.default, |(_, action)| *action);
        action == ActionConfig::Mirror
    }

    /// A live capture's selector: whether a copy's frame passes.
    pub fn into_selector(self) -> crate::targets::watch::Selector {
        Box::new(move |frame| self.selects(frame))
    }
}

/// Reads `text` (e.g. `tcp port 443 and not host 10.1.2.3`).
pub fn parse(text: &str) -> Result<Expr, FilterError> {
    parse::parse(lex::tokens(text)?, text.len())
}

/// Compiles `text`: into rules when the rule tables hold it, else into a program that one rule
/// carries. When neither can, the error says why for both.
pub fn compile(text: &str) -> Result<Filter, FilterError> {
    let tables = match compile_tables(text) {
        Ok(filter) => return Ok(filter),
        Err(error) => error,
    };
    let program = program::compile(text).map_err(|beyond| FilterError {
        offset: tables.offset,
        message: format!(
            "{} (the rule tables stopped here: {})",
            beyond.message, tables.message
        ),
    })?;
    let (rules, program) = if program.rejects_all() {
        (Vec::new(), None)
    } else {
        (
            vec![(Fields::default(), ActionConfig::Mirror)],
            Some(Arc::new(program)),
        )
    };
    Ok(Filter {
        rules,
        default: ActionConfig::Skip,
        program,
    })
}

/// Compiles `text` into at most [`MAX_FILTER_RULES`] rules, or says what the rule tables cannot
/// hold.
pub fn compile_tables(text: &str) -> Result<Filter, FilterError> {
    let decisions = decide::Decisions::of(&parse(text)?, MAX_FILTER_RULES).map_err(|_| {
        FilterError::at(
            0,
            format!(
                "the expression needs more than {MAX_FILTER_RULES} rules: \
                 split it into sessions, or use fewer `or`s under `and`/`not`"
            ),
        )
    })?;
    let action = |mirror| {
        if mirror {
            ActionConfig::Mirror
        } else {
            ActionConfig::Skip
        }
    };
    Ok(Filter {
        rules: decisions
            .rules
            .into_iter()
            .map(|(fields, mirror)| (fields, action(mirror)))
            .collect(),
        default: action(decisions.default),
        program: None,
    })
}

/// The rules, one per combination of directions, that together match what `expr` (an expression
/// without `not`) matches; `None` when that takes more than `limit`.
pub fn expand(expr: &Expr, limit: usize) -> Option<Vec<Fields>> {
    let decisions = decide::Decisions::of(expr, limit).ok()?;
    debug_assert!(decisions.rules.iter().all(|(_, mirror)| *mirror));
    Some(
        decisions
            .rules
            .into_iter()
            .map(|(fields, _)| fields)
            .collect(),
    )
}

#[cfg(test)]
mod tests;
