//! Empty library target: lets mirror-agent name this crate as a build-dependency, which makes cargo
//! rebuild the agent (and so the embedded eBPF object) whenever this crate changes.
#![no_std]
