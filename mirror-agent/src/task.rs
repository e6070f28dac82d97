//! Tasks tied to an owner: the link and route followers' netlink connections, the kernel log
//! reader of a generation.

/// A task ended when this is dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
