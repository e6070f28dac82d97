//! What the agent follows after the start, for whatever configuration is applied then: the
//! kernel's link events ([`links`]: interfaces that appear or go), its route and neighbour events
//! ([`routes`]: tunnels' next hops), and the node's pods from the Kubernetes API ([`pods`]).
pub mod links;
pub mod pods;
pub mod routes;
