//! Opening a C library at run time (dlopen(3)), for the network stores:
//! `cargo build` links no C library, and only a daemon asked for an NBD or
//! RBD image needs libnbd or librbd installed.

use std::ffi::{c_void, CStr};

/// A handle on `soname`, never closed (so that every function looked up in
/// it stays mapped for the life of the process), or dlerror's reason.
pub(super) fn open(soname: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: dlopen of a plain shared library whose initialisers are its
    // own; the handle is never closed.
    let lib = unsafe { libc::dlopen(soname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if !lib.is_null() {
        return Ok(lib);
    }
    // SAFETY: dlerror returns NULL or a NUL-terminated string, copied here
    // before any other dl* call.
    let err = unsafe { libc::dlerror() };
    Err(if err.is_null() {
        format!("dlopen {} failed", soname.to_string_lossy())
    } else {
        // SAFETY: see above.
        unsafe { CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned()
    })
}
