//! `pfc_config.struct_size` (SPEC §2b): a program built against an older header passes a shorter
//! struct, whose missing fields take their defaults and whose bytes beyond `struct_size` are never
//! read; a newer header's longer struct is refused with PFC_ERR_INCOMPATIBLE.

use crate::common::*;
use partialfc::ffi::*;
use std::mem::{offset_of, size_of};

/// The first released layout ended before `world_size`.
const OLDEST: usize = offset_of!(pfc_config, world_size);

fn config() -> pfc_config {
    let mut c = default_config();
    c.num_classes = 12;
    c.embedding_dim = 4;
    c.local_shards = 3;
    c.seed = 5;
    c
}

/// `cfg`'s first `size` bytes in a buffer whose remaining bytes are garbage (0xAB), with
/// `struct_size = size`: what an older program's struct, followed by unrelated memory, looks like.
fn truncated(cfg: &pfc_config, size: usize) -> Vec<u64> {
    let mut buf = vec![0xABAB_ABAB_ABAB_ABABu64; size_of::<pfc_config>() / 8 + 4];
    // SAFETY: both regions hold at least `size` bytes.
    unsafe { std::ptr::copy_nonoverlapping((cfg as *const pfc_config).cast::<u8>(), buf.as_mut_ptr().cast::<u8>(), size) };
    buf[0] = (buf[0] & !0xFFFF_FFFF) | size as u64; // struct_size is the first field (little-endian)
    buf
}

fn create(buf: &[u64]) -> Result<TestHead, (pfc_status, String)> {
    let mut h = std::ptr::null_mut();
    let s = pfc_create(buf.as_ptr().cast(), &mut h);
    if s == PFC_OK {
        Ok(TestHead(h))
    } else {
        assert!(h.is_null(), "a failed pfc_create wrote *out");
        Err((s, last_error()))
    }
}

#[test]
fn every_older_layout_gets_defaults_for_the_fields_it_lacks() {
    let full = size_of::<pfc_config>();
    let reference = TestHead::new(&config());
    let want = reference.centers(4);
    let mut sizes: Vec<usize> = (OLDEST..=full).step_by(8).collect();
    assert!(sizes.len() >= 2 && sizes[0] == OLDEST && *sizes.last().unwrap() == full);
    sizes.dedup();
    for size in sizes {
        // Fields past `size` hold garbage in the buffer; read, they would fail validation
        // (world_size 0xABABABAB, a wild nccl_id, ...) or change the head.
        let head = create(&truncated(&config(), size)).unwrap_or_else(|(s, m)| panic!("struct_size {size}: status {s}: {m}"));
        assert_eq!(head.local_classes(), (0, 12), "struct_size {size}");
        assert_eq!(head.centers(4), want, "struct_size {size}: not the head the full struct makes");
    }
}

#[test]
fn the_first_released_layout_trains_like_the_current_one() {
    let old = create(&truncated(&config(), OLDEST)).unwrap_or_else(|(s, m)| panic!("status {s}: {m}"));
    let new = TestHead::new(&config());
    let emb: Vec<f32> = (0..6 * 4).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
    let labels = [0i64, 5, 11, 3, 7, 2];
    for _ in 0..3 {
        let (a, ga) = old.step(&emb, &labels, 4, &[2, 2, 2]);
        let (b, gb) = new.step(&emb, &labels, 4, &[2, 2, 2]);
        assert_eq!((a.loss.to_bits(), a.step), (b.loss.to_bits(), b.step));
        assert_eq!(ga, gb);
    }
    assert_eq!(old.centers(4), new.centers(4));
}

#[test]
fn sizes_no_header_ever_had_are_refused() {
    let full = size_of::<pfc_config>();
    for (size, needle) in [
        (full + 8, "newer header"),
        (full + 4096, "newer header"),
        (u32::MAX as usize, "newer header"),
        (OLDEST - 8, "not the size of any pfc_config layout"),
        (0, "not the size of any pfc_config layout"),
        (OLDEST + 4, "not the size of any pfc_config layout"),
        (full - 4, "not the size of any pfc_config layout"),
    ] {
        let mut buf = truncated(&config(), size.min(full));
        buf[0] = (buf[0] & !0xFFFF_FFFF) | size as u64;
        match create(&buf) {
            Ok(_) => panic!("struct_size {size} was accepted"),
            Err((s, m)) => {
                assert_eq!(s, PFC_ERR_INCOMPATIBLE, "struct_size {size}: {m}");
                assert!(m.contains("struct_size") && m.contains(needle), "struct_size {size}: {m}");
            }
        }
    }
}
