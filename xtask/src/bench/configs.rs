//! The agent configurations the mirror scenarios run, and the rule sets they share with `tc u32`.
use std::fmt::Write as _;

use anyhow::{Context as _, bail};

use super::{FLOW_DST, FLOW_DST_PORT, Scenario, TUNNELS, VXLAN_REMOTE};

/// `rules - 1` random non-matching (destination prefix, destination port) rules, then the
/// matching one. Half the prefixes contain the flow's destination, so the prefix lookup alone does
/// not rule them out: only the port does.
pub(super) fn rule_set(rules: usize) -> Vec<(String, u16)> {
    // Seeded: every run builds the same rule sets.
    let mut rng = fastrand::Rng::with_seed(42);
    let mut set = Vec::with_capacity(rules);
    while set.len() + 1 < rules {
        let r = rng.u64(..);
        let port = (r % 65_535) as u16 + 1;
        if port == FLOW_DST_PORT {
            continue;
        }
        let len = 8 + (r >> 20) % 25;
        let base: u32 = if r & (1 << 40) == 0 {
            u32::from(FLOW_DST.parse::<std::net::Ipv4Addr>().expect("address"))
        } else {
            0xac10_0000 | ((r >> 44) as u32 & 0x000f_ffff)
        };
        let net = std::net::Ipv4Addr::from(base & (u32::MAX << (32 - len)));
        set.push((format!("{net}/{len}"), port));
    }
    set.push((format!("{FLOW_DST}/32"), FLOW_DST_PORT));
    set
}

fn mirror_config(rules: usize, matching: bool) -> String {
    let mut config = "stats_interval_secs = 0\n[[session]]\nname = \"bench\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = { interface = \"mir0\" }\n".to_owned();
    let mut set = rule_set(rules);
    if !matching {
        // The flow's destination, the next port: nothing matches.
        set.last_mut().expect("a rule").1 = FLOW_DST_PORT + 1;
    }
    for (number, (net, port)) in set.into_iter().enumerate() {
        writeln!(
            config,
            "[[session.rule]]\nnumber = {}\naction = \"mirror\"\nproto = \"udp\"\ndst = \"{net}\"\ndst_port = {port}",
            number + 1
        )
        .expect("writing to a String");
    }
    config
}

/// The agent's configuration for a mirror scenario: one session on src0's ingress.
pub(super) fn agent_config(scenario: &Scenario) -> anyhow::Result<String> {
    const SESSION: &str =
        "stats_interval_secs = 0\n[[session]]\nname = \"bench\"\ninterfaces = [\"src0\"]\n";
    Ok(match scenario {
        Scenario::Mirror { rules, matching } => mirror_config(*rules, *matching),
        Scenario::MirrorAll => format!(
            "{SESSION}direction = \"ingress\"\ndefault = \"mirror\"\ntarget = {{ interface = \"mir0\" }}\n"
        ),
        Scenario::MirrorFilter => format!(
            "{SESSION}direction = \"ingress\"\ntarget = {{ interface = \"mir0\" }}\n\
             filter = \"udp and dst net {FLOW_DST}/32 and dst port {FLOW_DST_PORT}\"\n"
        ),
        Scenario::MirrorAccessor => {
            let dst = u32::from(FLOW_DST.parse::<std::net::Ipv4Addr>().expect("address"));
            format!(
                "{SESSION}direction = \"ingress\"\ntarget = {{ interface = \"mir0\" }}\n\
                 filter = \"udp and ip[16:4] = {dst:#x} and udp[2:2] = {FLOW_DST_PORT}\"\n"
            )
        }
        Scenario::MirrorControlled { control, .. } => format!(
            "{SESSION}direction = \"ingress\"\ndefault = \"mirror\"\ntarget = {{ interface = \"mir0\" }}\n{control}\n"
        ),
        Scenario::MirrorTunnel(format) => {
            let (_, target) = TUNNELS
                .iter()
                .find(|(name, _)| name == format)
                .context("a tunnel format of TUNNELS")?;
            format!(
                "{SESSION}direction = \"ingress\"\ndefault = \"mirror\"\ntarget = {{ {target} }}\n"
            )
        }
        Scenario::MirrorXdp { vxlan } => {
            let target = if *vxlan {
                format!("{{ vxlan = {{ remote = \"{VXLAN_REMOTE}\", vni = 42 }} }}")
            } else {
                "{ interface = \"mir0\" }".to_owned()
            };
            format!("{SESSION}hook = \"xdp\"\ndefault = \"mirror\"\ntarget = {target}\n")
        }
        _ => bail!("{} runs no agent", scenario.name()),
    })
}
