//! Device state transfer (VHOST_USER_PROTOCOL_F_DEVICE_STATE): what
//! cloud-hypervisor's snapshot/restore and a VMM's migration ask a backend
//! for once its rings are stopped.
//!
//! A drained block device has no state of its own to carry: the data is in
//! the image and the rings are the VMM's. The transfer still has to happen
//! (a VMM that negotiated the feature expects an answer in both directions),
//! and it is where a mismatch can be caught: the saved state names the
//! format and the disk's capacity and sector size, and a load onto a device
//! of another size or sector size fails CHECK_DEVICE_STATE instead of
//! letting a restored guest find a different disk. A save with requests
//! still in flight is refused: a VMM must stop the rings first.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::Mutex;
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};

use super::blk::BlkDevice;

const MAGIC: &[u8; 16] = b"cryptblk-state\0\x01";
/// Magic, capacity, sector size.
const LEN: usize = 16 + 8 + 4;
/// A state larger than this is not ours: stop reading.
const MAX_LEN: u64 = 4096;

/// The transfer in progress (a load reads the VMM's pipe on a thread of
/// its own, as the VMM writes it only after our reply) or its outcome.
#[derive(Default)]
pub struct Transfer {
    outcome: Mutex<Option<Outcome>>,
}

enum Outcome {
    Done(Result<(), String>),
    Loading(JoinHandle<Result<(), String>>),
}

impl Transfer {
    /// SET_DEVICE_STATE_FD: saves into or loads from `file` (the VMM's).
    pub fn start(
        &self,
        dev: &BlkDevice,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        mut file: File,
    ) -> io::Result<()> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(io::Error::other("only the STOPPED phase is defined"));
        }
        let in_flight: u64 = dev.stats().snapshot().1.in_flight;
        if in_flight > 0 {
            return Err(io::Error::other(format!(
                "{in_flight} requests are still in flight: stop the rings (GET_VRING_BASE) first"
            )));
        }
        let expected = encode(dev);
        let outcome = match direction {
            // Small enough for any pipe: written before the reply.
            VhostTransferStateDirection::SAVE => {
                Outcome::Done(file.write_all(&expected).map_err(|e| e.to_string()))
            }
            VhostTransferStateDirection::LOAD => Outcome::Loading(
                std::thread::Builder::new()
                    .name("device-state".into())
                    .spawn(move || load(file, &expected))?,
            ),
        };
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
        Ok(())
    }

    /// CHECK_DEVICE_STATE: how the last transfer ended.
    pub fn check(&self) -> io::Result<()> {
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let result = match outcome {
            None => Err("no state transfer was started".to_string()),
            Some(Outcome::Done(r)) => r,
            Some(Outcome::Loading(t)) => t
                .join()
                .unwrap_or_else(|_| Err("the state loader panicked".into())),
        };
        result.map_err(|e| {
            log::error!("device state transfer: {e}");
            io::Error::other(e)
        })
    }
}

fn encode(dev: &BlkDevice) -> Vec<u8> {
    let mut s = Vec::with_capacity(LEN);
    s.extend_from_slice(MAGIC);
    s.extend_from_slice(&dev.volume().capacity_bytes().to_le_bytes());
    s.extend_from_slice(&(dev.volume().sector_size() as u32).to_le_bytes());
    s
}

/// Reads the VMM's state to its end and compares it with this device's.
fn load(file: File, expected: &[u8]) -> Result<(), String> {
    let mut got = Vec::new();
    file.take(MAX_LEN)
        .read_to_end(&mut got)
        .map_err(|e| format!("cannot read the state: {e}"))?;
    if got.len() != LEN || &got[..16] != MAGIC {
        return Err(format!(
            "the state ({} bytes) is not a cryptblk block device's",
            got.len()
        ));
    }
    if got != expected {
        let field = |s: &[u8], a: usize, b: usize| s[a..b].to_vec();
        let cap = |s: &[u8]| u64::from_le_bytes(field(s, 16, 24).try_into().unwrap());
        let sec = |s: &[u8]| u32::from_le_bytes(field(s, 24, 28).try_into().unwrap());
        return Err(format!(
            "the state is of a {}-byte disk with {}-byte sectors; this one has {} bytes and {}-byte sectors",
            cap(&got),
            sec(&got),
            cap(expected),
            sec(expected)
        ));
    }
    Ok(())
}
