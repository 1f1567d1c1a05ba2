//! What the stores' unit tests share: driving any store (io_uring, NBD,
//! RBD, each wrapped in the daemon's own `Store`) to its completions, the same exercises on each, and checking a
//! table of C signatures against the library's header.

use std::time::{Duration, Instant};

use super::{BufId, Op, Store};

/// Waits for `n` completions and hands each to `f(tag, result)`; fails
/// the test when 60 s pass without them.
pub fn reap_n(s: &mut Store, n: usize, mut f: impl FnMut(u64, i32)) {
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        s.wait().unwrap();
        s.clear_event();
        s.reap(|t, r| {
            done += 1;
            f(t, r)
        })
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(60), "no completion");
    }
}

/// Pushes `op` as `tag`, submits it and returns its result (bytes moved,
/// or a negative errno).
pub fn run(s: &mut Store, op: Op, tag: u64) -> i32 {
    s.push(op, tag).unwrap();
    s.submit().unwrap();
    let mut got = None;
    reap_n(s, 1, |t, r| {
        assert_eq!(t, tag);
        got = Some(r);
    });
    got.unwrap()
}

/// Writes 64 KiB of 0x5c at 8 KiB from a buffer of `s` (tag 7), syncs
/// (tag 8), and reads 4 KiB of it back, at 12 KiB, into the same buffer
/// (tag 9). Returns the buffer and that read, for reading it again.
pub fn write_sync_read(s: &mut Store) -> (BufId, Op) {
    let b = s.buffers().take().unwrap();
    s.buffers().bytes_mut(b, 65536).fill(0x5c);
    let write = Op::Write {
        buf: b,
        len: 65536,
        offset: 8192,
    };
    assert_eq!(run(s, write, 7), 65536);
    assert_eq!(run(s, Op::Sync, 8), 0);
    s.buffers().bytes_mut(b, 65536).fill(0);
    let read = Op::Read {
        buf: b,
        len: 4096,
        offset: 8192 + 4096,
    };
    assert_eq!(run(s, read, 9), 4096);
    assert!(s.buffers().bytes_mut(b, 4096).iter().all(|&x| x == 0x5c));
    (b, read)
}

/// 64 writes of 64 KiB in flight at once, buffer i (the pool's first 64,
/// taken here) filled with i + 1 and written at `offset(i)` as tag i.
/// Returns the tags in the order they completed, every one with 65536.
pub fn write_64_at_once(s: &mut Store, offset: impl Fn(u16) -> u64) -> Vec<u64> {
    for i in 0..64u16 {
        let b = s.buffers().take().unwrap();
        assert_eq!(b, i);
        s.buffers().bytes_mut(b, 65536).fill(i as u8 + 1);
        let op = Op::Write {
            buf: b,
            len: 65536,
            offset: offset(i),
        };
        s.push(op, u64::from(i)).unwrap();
    }
    s.submit().unwrap();
    assert!(s.in_flight() > 0);
    let mut seen = Vec::new();
    reap_n(s, 64, |t, r| {
        assert_eq!(r, 65536, "tag {t}");
        seen.push(t)
    });
    seen
}

/// After `write_64_at_once`: reads each write back into another buffer
/// (reversed: buffer i from `offset(63 - i)`), all in flight at once, and
/// checks the data.
pub fn read_back_64_reversed(s: &mut Store, offset: impl Fn(u16) -> u64) {
    for i in 0..64u16 {
        s.buffers().bytes_mut(i, 65536).fill(0);
        let op = Op::Read {
            buf: i,
            len: 65536,
            offset: offset(63 - i),
        };
        s.push(op, u64::from(i)).unwrap();
    }
    s.submit().unwrap();
    reap_n(s, 64, |_, r| assert_eq!(r, 65536));
    for i in 0..64u16 {
        let want = (63 - i) as u8 + 1;
        assert!(s.buffers().bytes_mut(i, 65536).iter().all(|&x| x == want));
    }
}

/// Every function of `table` (name, signature as the table declares it)
/// is declared in the C header `header` with exactly that signature: the
/// ABI is read from the header, never guessed. `api` is the word before
/// each declaration ("extern", "CEPH_RBD_API"); `rust_type` spells a C
/// type (white space folded, `*` attached to the type) as the table does;
/// `package` is the Debian package that installs the header.
pub fn check_header(
    header: &str,
    package: &str,
    api: &str,
    table: &[(&str, &str)],
    rust_type: impl Fn(&str) -> &'static str,
) {
    let text = std::fs::read_to_string(header).unwrap_or_else(|e| {
        panic!("{header}: {e}: install {package} (integration/install-deps.sh)")
    });
    let c_type = |c: &str| {
        let c = c.split_whitespace().collect::<Vec<_>>().join(" ");
        let c = c.replace(" *", "*").replace("* const", "*const");
        // A top-level const on a parameter (`const char *const name`) is
        // not part of the ABI.
        let c = c
            .strip_suffix("*const")
            .map_or(c.clone(), |s| format!("{s}*"));
        rust_type(&c)
    };
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    // Every declaration: "API RET NAME(PARAMS)", up to its ';'.
    let decls: Vec<&str> = flat
        .split(&format!("{api} "))
        .skip(1)
        .filter_map(|d| d.split(';').next())
        .collect();
    for (name, sig) in table {
        let decl = decls
            .iter()
            .find_map(|d| {
                let at = [format!("{name}("), format!("{name} (")]
                    .iter()
                    .find_map(|p| d.find(p.as_str()))?;
                (at > 0 && matches!(d.as_bytes()[at - 1], b' ' | b'*'))
                    .then_some((d[..at].trim_end(), &d[at + name.len()..]))
            })
            .unwrap_or_else(|| panic!("{name} is not declared in {header}"));
        let ret = c_type(decl.0);
        let open = decl.1.find('(').unwrap();
        let close = decl.1.find(')').unwrap();
        let params: Vec<&str> = decl.1[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|p| *p != "void")
            .map(|p| {
                // Drop the parameter's name: the type is what precedes it.
                let cut = p
                    .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .map_or(0, |i| i + 1);
                c_type(&p[..cut])
            })
            .collect();
        let c_sig = format!("({}) -> {ret}", params.join(", "));
        // stringify! spaces tokens as it likes: compare without spaces.
        let ours: String = sig.split_whitespace().collect();
        let c_sig: String = c_sig.split_whitespace().collect();
        assert_eq!(ours, c_sig, "{name} in {header}");
    }
}
