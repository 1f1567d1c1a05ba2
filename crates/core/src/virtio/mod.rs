//! virtio-blk on the wire: descriptor chains in, typed requests out.
//! Every number a guest controls is checked here, once.

mod chain;
mod guest;
mod request;

pub use chain::chain_at;
pub use guest::{GuestBufs, Unmapped};
pub use request::{parse, sub_segments, Limits, Parsed, Request, RequestError, Segment};

pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
