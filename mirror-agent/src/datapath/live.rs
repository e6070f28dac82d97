//! What changes while a datapath runs: interfaces watched and let go after the start, copy
//! programs at new targets and underlays, and the sessions' and tunnels' entries the followers
//! rewrite.
use aya::maps::{Array, HashMap};
use mirror_common::{
    AttachmentKey, Direction, RULE_BITMAPS_MAP, SESSIONS_MAP, SessionMeta, TUNNELS_MAP, Tunnel,
};

use super::{Datapath, DatapathError, Hook, fill_hash, map, map_err, release, set_attachment};
use crate::targets::KernelEntries;

impl Datapath {
    /// Watches an interface that appeared (or was selected) after the start: classifies its
    /// packets in `direction` against `bitmap`, the rules of `sessions`, and attaches the mirror
    /// program unless it is attached. The bitmap and the attachment entry are written before the
    /// program is attached.
    pub fn watch_later(
        &mut self,
        interface: &str,
        ifindex: u32,
        direction: Direction,
        sessions: &[usize],
        bitmap: impl FnOnce() -> mirror_common::RuleBitmap,
    ) -> Result<(), DatapathError> {
        let index = if let Some(index) = self.later_bitmaps.get(sessions) {
            *index
        } else {
            let index = self.next_bitmap;
            let mut bitmaps = Array::<_, mirror_common::RuleBitmap>::try_from(map(
                &mut self.ebpf,
                RULE_BITMAPS_MAP,
            )?)
            .map_err(map_err(RULE_BITMAPS_MAP))?;
            bitmaps
                .set(index, bitmap(), 0)
                .map_err(map_err(RULE_BITMAPS_MAP))?;
            self.next_bitmap += 1;
            self.later_bitmaps.insert(sessions.to_vec(), index);
            index
        };
        self.watch_with(ifindex, direction, index, sessions)?;
        // Attached already (by the plan or earlier): the new entry is all that changes.
        if self
            .links
            .iter()
            .any(|a| a.hook == Hook::Mirror(direction) && a.interface == interface)
        {
            return Ok(());
        }
        self.attach_new(Hook::Mirror(direction), interface)
    }

    /// Stops watching `interface` in `direction`: its attachment entry goes first (the program
    /// passes its packets untouched from then on), then its link. Returns whether it was watched.
    pub fn unwatch(&mut self, interface: &str, ifindex: u32, direction: Direction) -> bool {
        let key = AttachmentKey {
            ifindex,
            direction: direction as u32,
        };
        if let Err(error) = set_attachment(&mut self.ebpf, key, None) {
            tracing::warn!("{interface}: {error}");
        }
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|a| a.hook == Hook::Mirror(direction) && a.interface == interface);
        self.links = kept;
        let watched = !gone.is_empty();
        release(gone);
        watched
    }

    /// Forgets an interface that is gone: its attachment entries (its index may be reused) and
    /// its links, the copy program's too (the kernel detached them with the device). Returns
    /// whether it was watched.
    pub fn forget(&mut self, interface: &str, ifindex: u32) -> bool {
        let mut watched = false;
        for direction in [Direction::Ingress, Direction::Egress, Direction::XdpIngress] {
            watched |= self.unwatch(interface, ifindex, direction);
        }
        let (gone, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.links).into_iter().partition(|a| {
                a.hook == Hook::Copy && a.interface == interface && a.ifindex == ifindex
            });
        self.links = kept;
        release(gone);
        watched
    }

    /// The interfaces programs are attached to, (name, index when attached).
    pub fn attached_interfaces(&self) -> Vec<(String, u32)> {
        let mut interfaces: Vec<_> = self
            .links
            .iter()
            .map(|a| (a.interface.clone(), a.ifindex))
            .collect();
        interfaces.sort();
        interfaces.dedup();
        interfaces
    }

    /// The watched (interface, direction) hooks attached now.
    pub fn attached(&self) -> Vec<(String, Direction)> {
        self.links
            .iter()
            .filter_map(|a| match a.hook {
                Hook::Mirror(direction) => Some((a.interface.clone(), direction)),
                Hook::Copy => None,
            })
            .collect()
    }

    /// Turns on or off the copies a session's TC path puts into the ring for `capture`
    /// watchers.
    pub fn set_watched(&mut self, session: u32, watched: bool) -> Result<(), DatapathError> {
        self.change_session(session, |entry| entry.watched = u32::from(watched))
    }

    fn change_session(
        &mut self,
        session: u32,
        change: impl FnOnce(&mut SessionMeta),
    ) -> Result<(), DatapathError> {
        let mut array = Array::<_, SessionMeta>::try_from(map(&mut self.ebpf, SESSIONS_MAP)?)
            .map_err(map_err(SESSIONS_MAP))?;
        let mut entry = array.get(&session, 0).map_err(map_err(SESSIONS_MAP))?;
        change(&mut entry);
        array.set(session, entry, 0).map_err(map_err(SESSIONS_MAP))
    }
}

impl KernelEntries for Datapath {
    type Error = DatapathError;

    /// Makes sure the copy program finishes copies at `interface` (a tunnel's underlay that a
    /// route change brought): attached if it is not.
    fn finish_copies_at(&mut self, interface: &str) -> Result<(), DatapathError> {
        if self
            .links
            .iter()
            .any(|a| a.hook == Hook::Copy && a.interface == interface)
        {
            return Ok(());
        }
        self.attach_new(Hook::Copy, interface)
    }

    /// Rewrites a session's `SESSIONS` entry (a tunnel's size limit follows its path), keeping
    /// its `watched` flag.
    fn set_session(&mut self, session: u32, meta: &SessionMeta) -> Result<(), DatapathError> {
        self.change_session(session, |entry| {
            *entry = SessionMeta {
                watched: entry.watched,
                ..*meta
            };
        })
    }

    /// Writes a tunnel session's hop and outer header (replacing the entry whole).
    fn set_tunnel(&mut self, session: u32, tunnel: &Tunnel) -> Result<(), DatapathError> {
        fill_hash(&mut self.ebpf, TUNNELS_MAP, &[(session, *tunnel)])
    }

    /// Removes a tunnel session's hop: its copies are counted as `no_route` until it is back.
    fn clear_tunnel(&mut self, session: u32) -> Result<(), DatapathError> {
        let mut hash = HashMap::<_, u32, Tunnel>::try_from(map(&mut self.ebpf, TUNNELS_MAP)?)
            .map_err(map_err(TUNNELS_MAP))?;
        match hash.remove(&session) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(TUNNELS_MAP)(e)),
        }
    }
}
