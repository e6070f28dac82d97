//! The agent as a long-running daemon: interfaces that come and go after the start.
use std::time::Instant;

use mirror_tests::{
    Capture, Counts, Lab, NODE_SRC_MAC, SRC_MAC, agent_command, session_config, tcx_programs,
    udp_v4_frame, wait_for,
};

/// The (interface, direction) pairs `status --json` lists as attached.
fn attached(lab: &Lab, socket: &str) -> Vec<(String, String)> {
    let (code, stdout, stderr) =
        agent_command(&lab.node, &["status", "--json", "--api-socket", socket]);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("status JSON");
    serde_json::from_value(status["attached"].clone()).expect("attached pairs")
}

#[test]
fn an_interface_matching_a_glob_is_followed_as_it_comes_and_goes() {
    let lab = Lab::new("follow");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let socket = socket.to_str().expect("utf-8");
    let config = format!(
        "api_socket = \"{socket}\"\n{}",
        session_config(
            "[\"src0\", \"dyn*\"]",
            "ingress",
            "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n",
        )
    );
    let agent = lab.start_agent(&config);
    let copies = Capture::open(&lab.mon, "eth0");
    let src = lab.src.name.as_str();

    for round in 0..2 {
        // A veth created after the start: dyn0 on the node, its peer dyn1 in src.
        let created = Instant::now();
        lab.node.ip(&[
            "link", "add", "dyn0", "type", "veth", "peer", "name", "dyn1", "netns", src,
        ]);
        lab.node.ip(&["link", "set", "dyn0", "up"]);
        lab.src.ip(&["link", "set", "dyn1", "up"]);
        wait_for("the mirror program on dyn0", || {
            tcx_programs(&lab.node, "dyn0")[0] == ["mirror_tc_ingre"]
        });
        println!(
            "round {round}: dyn0 watched {} ms after it was created",
            created.elapsed().as_millis()
        );
        assert!(
            attached(&lab, socket).contains(&("dyn0".to_owned(), "ingress".to_owned())),
            "status lists dyn0"
        );

        let sender = mirror_tests::FrameSender::open(&lab.src, "dyn1");
        let frame = udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 5555, &[round; 40]);
        let unmatched = udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 5556, &[round; 40]);
        sender.send(&unmatched);
        sender.send(&frame);
        sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
        let got = copies.bytes_until_sentinel();
        assert_eq!(got, [frame], "round {round}: one copy, byte for byte");

        // src0 keeps being mirrored while dyn0 comes and goes.
        lab.send_sentinel();
        assert!(copies.bytes_until_sentinel().is_empty());

        lab.node.ip(&["link", "del", "dyn0"]);
        wait_for("dyn0 forgotten", || {
            !attached(&lab, socket).iter().any(|(i, _)| i == "dyn0")
        });
        assert_eq!(
            attached(&lab, socket),
            [("src0".to_owned(), "ingress".to_owned())]
        );
    }
    let report = agent.stop();
    assert_eq!(report.rule("t", "10"), Counts::copied(2, 2));
    assert_eq!(report.rule("t", "1"), Counts::copied(4, 4));
}
