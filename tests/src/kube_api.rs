//! A stand-in for the Kubernetes API server, for the pod-selector tests and benchmarks: no real
//! API server can run on these machines. It serves the two requests the agent's pod watcher makes
//! — `GET /api/v1/pods` (a `PodList`) and the same with `watch=true` (a chunked stream of
//! `WatchEvent`s) — from real `Pod` objects of the API's own types (k8s-openapi), with resource
//! versions, like an API server does; it honours the `spec.nodeName` field selector, records every
//! query, and can expire its watches (`410 Gone`) to make the client list again. Not covered:
//! authentication, TLS, paging.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex, mpsc},
};

use k8s_openapi::{
    api::core::v1::{Container, Pod, PodIP, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::Netns;

/// The node the agent under test runs on.
pub const NODE: &str = "node-a";

/// The stand-in API server: the pods it knows and the watches open on it.
#[derive(Debug, Default)]
pub struct ApiState {
    pods: BTreeMap<String, Pod>,
    resource_version: u64,
    watchers: Vec<mpsc::Sender<String>>,
    /// The next watch is answered `410 Gone` (its resource version is too old), as an API
    /// server does after compacting its history: the client must list again.
    expired: bool,
    /// The query of every request, in order.
    queries: Vec<String>,
}

#[derive(Debug)]
pub struct FakeApi {
    state: Arc<Mutex<ApiState>>,
    port: u16,
}

impl FakeApi {
    /// Listens on the loopback of `ns`, where the agent runs.
    pub fn start(ns: &Netns) -> Self {
        let listener = ns.enter(|| TcpListener::bind("127.0.0.1:0").expect("bind"));
        let port = listener.local_addr().expect("address").port();
        let state = Arc::new(Mutex::new(ApiState::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let state = shared.clone();
                std::thread::spawn(move || serve(&state, stream));
            }
        });
        FakeApi { state, port }
    }

    /// Adds or replaces a pod (`ADDED` or `MODIFIED` to the open watches).
    pub fn apply(&self, pod: Pod) {
        let mut state = self.state.lock().expect("state");
        let (kind, pod) = state.put(pod);
        notify(&mut state, kind, &pod);
    }

    pub fn delete(&self, name: &str) {
        let mut state = self.state.lock().expect("state");
        state.resource_version += 1;
        let mut pod = state.pods.remove(name).expect("a pod of that name");
        pod.metadata.resource_version = Some(state.resource_version.to_string());
        notify(&mut state, "DELETED", &pod);
    }

    pub fn relabel(&self, name: &str, app: &str) {
        let pod = self.state.lock().expect("state").relabelled(name, app);
        self.apply(pod);
    }

    /// Ends every watch and has the next one expire, and makes `change` at once, unseen by any
    /// watch: only a new list tells it.
    pub fn expire_watches_with(&self, change: impl FnOnce(&mut ApiState)) {
        let mut state = self.state.lock().expect("state");
        state.watchers.clear();
        state.expired = true;
        change(&mut state);
    }

    /// Every request the agent made listed or watched the pods of [`NODE`] only, and it watched.
    pub fn assert_asked_for_this_node_only(&self) {
        let queries = self.state.lock().expect("state").queries.clone();
        assert!(
            queries
                .iter()
                .all(|q| q.contains(&format!("fieldSelector=spec.nodeName={NODE}"))),
            "every request asks for this node's pods only: {queries:?}"
        );
        assert!(
            queries.iter().any(|q| q.contains("watch=true")),
            "{queries:?}"
        );
    }

    /// How many lists (requests without `watch=true`) were served.
    pub fn lists(&self) -> usize {
        let state = self.state.lock().expect("state");
        state
            .queries
            .iter()
            .filter(|q| !q.split('&').any(|p| p == "watch=true"))
            .count()
    }

    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://127.0.0.1:{}\n\
             users:\n- name: agent\n  user: {{}}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: agent\n\
             current-context: lab\n",
            self.port
        )
    }
}

impl ApiState {
    /// Stores `pod` with the next resource version: whether it is new, and the pod as stored.
    pub fn put(&mut self, mut pod: Pod) -> (&'static str, Pod) {
        self.resource_version += 1;
        pod.metadata.resource_version = Some(self.resource_version.to_string());
        let key = pod.metadata.name.clone().expect("name");
        let kind = if self.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.pods.insert(key, pod.clone());
        (kind, pod)
    }

    pub fn relabelled(&self, name: &str, app: &str) -> Pod {
        let mut pod = self.pods[name].clone();
        pod.metadata.labels = Some(BTreeMap::from([("app".to_owned(), app.to_owned())]));
        pod
    }
}

/// Sends a watch event to every open watch of a pod on [`NODE`].
fn notify(state: &mut ApiState, kind: &str, pod: &Pod) {
    if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(NODE) {
        return;
    }
    let event = serde_json::json!({ "type": kind, "object": pod }).to_string();
    state.watchers.retain(|w| w.send(event.clone()).is_ok());
}

/// Answers one connection's requests: lists, and watches that stay open.
fn serve(state: &Mutex<ApiState>, stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut stream = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // Headers, up to the empty line; no request body comes with a GET.
        let mut header = String::new();
        while reader.read_line(&mut header).unwrap_or(0) > 2 {
            header.clear();
        }
        let target = request_line
            .split(' ')
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let query = query.replace("%3D", "=");
        state.lock().expect("state").queries.push(query.clone());
        if path != "/api/v1/pods" {
            let _ = write!(
                stream,
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
            );
            continue;
        }
        let on_node = |pod: &&Pod| {
            !query.contains("fieldSelector=spec.nodeName=")
                || query.contains(&format!(
                    "fieldSelector=spec.nodeName={}",
                    pod.spec
                        .as_ref()
                        .and_then(|s| s.node_name.as_deref())
                        .unwrap_or_default()
                ))
        };
        if query.split('&').any(|p| p == "watch=true") {
            let (sender, events) = mpsc::channel();
            {
                let mut state = state.lock().expect("state");
                if std::mem::take(&mut state.expired) {
                    let gone = serde_json::json!({
                        "type": "ERROR",
                        "object": {
                            "kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "reason": "Expired", "code": 410,
                            "message": "too old resource version",
                        },
                    });
                    sender.send(gone.to_string()).expect("own channel");
                    drop(sender);
                } else {
                    state.watchers.push(sender);
                }
            }
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            );
            let _ = stream.flush();
            // Events until the watch is ended (or the test ends: the agent is stopped first).
            for event in events {
                let line = format!("{event}\n");
                if write!(stream, "{:x}\r\n{line}\r\n", line.len()).is_err() {
                    return;
                }
                let _ = stream.flush();
            }
            let _ = write!(stream, "0\r\n\r\n");
            let _ = stream.flush();
            continue;
        }
        let body = {
            let state = state.lock().expect("state");
            serde_json::json!({
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": { "resourceVersion": state.resource_version.to_string() },
                "items": state.pods.values().filter(on_node).collect::<Vec<_>>(),
            })
            .to_string()
        };
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.flush();
    }
}

/// A pod of the API's own type, running on `node` with `ips` (the first is `podIP`).
pub fn pod(namespace: &str, name: &str, app: &str, node: &str, ips: &[&str]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            uid: Some(format!("uid-{namespace}-{name}")),
            labels: Some(BTreeMap::from([("app".to_owned(), app.to_owned())])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            containers: vec![Container {
                name: "app".to_owned(),
                image: Some("registry.k8s.io/pause:3.10".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            pod_ip: ips.first().map(|ip| (*ip).to_owned()),
            pod_ips: Some(
                ips.iter()
                    .map(|ip| PodIP {
                        ip: (*ip).to_owned(),
                    })
                    .collect(),
            ),
            ..PodStatus::default()
        }),
    }
}
