//! Export (safetensors, .npy, .fvecs; f32 and f16; raw and L2-normalized) read back independently —
//! by numpy and the safetensors package in a python3 subprocess, and byte for byte for .fvecs — and
//! `pfc_search` against a brute-force float64 scan, duplicate centers (exact ties) included.

use crate::common::*;
use crate::persist::*;
use partialfc::ffi::*;
use std::path::Path;
use std::process::Command;

const FORMATS: [(i32, &str); 3] = [(PFC_FORMAT_SAFETENSORS, "safetensors"), (PFC_FORMAT_NPY, "npy"), (PFC_FORMAT_FVECS, "fvecs")];

fn export(h: &TestHead, path: &Path, format: i32, dtype: i32, normalized: i32) -> pfc_status {
    pfc_export_centers(h.0, cpath(path).as_ptr(), format, dtype, normalized)
}

/// A head whose centers are random, with rows of very different norms. C spans several export chunks.
fn export_head(c: u64, d: u32, shards: u32) -> TestHead {
    let h = TestHead::new(&config(c, d, shards, false, 1.0));
    let mut rng = Rng(99);
    let values: Vec<f32> = (0..c as usize)
        .flat_map(|_| {
            let scale = 10f64.powf(rng.range(-3.0, 3.0));
            (0..d).map(|_| (rng.normal() * scale) as f32).collect::<Vec<_>>()
        })
        .collect();
    h.set_centers(&values);
    h
}

fn normalized_centers(h: &TestHead, c: u64, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; c as usize * d];
    ok(pfc_get_centers(h.0, 0, c, 1, out.as_mut_ptr()));
    out
}

fn le_bytes(values: &[f32], f16: bool) -> Vec<u8> {
    if f16 {
        values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()
    } else {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

fn python_with_numpy() -> bool {
    match Command::new("python3").args(["-c", "import numpy, safetensors"]).output() {
        Ok(o) if o.status.success() => true,
        _ if std::env::var_os("PFC_SKIP_NUMPY").is_some() => false,
        _ => panic!(
            "python3 with numpy and safetensors is needed to read the exports back: run scripts/test.sh \
             (it installs them) or `python3 -m pip install numpy safetensors`; PFC_SKIP_NUMPY=1 skips this check"
        ),
    }
}

/// numpy's view of an exported file: loads it with np.load or safetensors.numpy.load_file, checks
/// the shape and dtype, and writes the array's little-endian bytes to `out` for comparison.
const READER: &str = r#"
import sys, numpy as np
from safetensors.numpy import load_file
path, kind, rows, cols, dtype, out = sys.argv[1:7]
if kind == "npy":
    a = np.load(path, allow_pickle=False)
else:
    t = load_file(path)
    assert list(t.keys()) == ["centers"], list(t.keys())
    a = t["centers"]
assert a.shape == (int(rows), int(cols)), a.shape
assert a.dtype == np.dtype(dtype), a.dtype
assert a.flags["C_CONTIGUOUS"]
a.astype(a.dtype.newbyteorder("<")).tofile(out)
print("ok", a.shape, a.dtype)
"#;

fn numpy_bytes(path: &Path, kind: &str, rows: u64, cols: u32, dtype: &str, scratch: &Scratch) -> Vec<u8> {
    let out = scratch.path("numpy.bin");
    let o = Command::new("python3")
        .args(["-c", READER])
        .arg(path)
        .args([kind, &rows.to_string(), &cols.to_string(), dtype])
        .arg(&out)
        .output()
        .expect("cannot run python3");
    assert!(o.status.success(), "numpy could not read {}:\n{}", path.display(), String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

#[test]
fn exports_read_back_by_numpy_and_bytewise() {
    let (c, d) = (2 * 4096 + 37, 12u32);
    let h = export_head(c, d, 3);
    let raw = h.centers(d as usize);
    let unit = normalized_centers(&h, c, d as usize);
    // pfc_get_centers' normalization is L2: spot-check it against float64.
    for row in unit.chunks_exact(d as usize).step_by(97) {
        let n: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        assert!((n - 1.0).abs() < 1e-6, "normalized row has norm {n}");
    }
    let s = Scratch::new("export");
    let numpy = python_with_numpy();
    let mut checked = 0;
    for (format, ext) in FORMATS {
        for dtype in [PFC_DTYPE_F32, PFC_DTYPE_F16] {
            for normalized in [0, 1] {
                let path = s.path(&format!("centers-{dtype}-{normalized}.{ext}"));
                if format == PFC_FORMAT_FVECS && dtype == PFC_DTYPE_F16 {
                    assert_eq!(export(&h, &path, format, dtype, normalized), PFC_ERR_INVALID_ARGUMENT);
                    assert!(!path.exists());
                    continue;
                }
                ok(export(&h, &path, format, dtype, normalized));
                let values = if normalized == 1 { &unit } else { &raw };
                let f16 = dtype == PFC_DTYPE_F16;
                let want = le_bytes(values, f16);
                let file = std::fs::read(&path).unwrap();
                match format {
                    PFC_FORMAT_FVECS => {
                        // Each vector: int32 dimension, then its floats.
                        let mut expect = Vec::new();
                        for row in values.chunks_exact(d as usize) {
                            expect.extend_from_slice(&(d as i32).to_le_bytes());
                            expect.extend(le_bytes(row, false));
                        }
                        assert!(file == expect, "{}: .fvecs bytes differ", path.display());
                    }
                    PFC_FORMAT_SAFETENSORS => {
                        // The safetensors crate's view as well as numpy's.
                        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
                        assert_eq!(st.names().len(), 1);
                        let t = st.tensor("centers").unwrap();
                        assert_eq!(t.shape(), [c as usize, d as usize]);
                        assert_eq!(t.dtype(), if f16 { safetensors::Dtype::F16 } else { safetensors::Dtype::F32 });
                        assert!(t.data() == want.as_slice());
                        if numpy {
                            let got = numpy_bytes(&path, "safetensors", c, d, if f16 { "float16" } else { "float32" }, &s);
                            assert!(got == want, "{}: numpy reads other values", path.display());
                        }
                    }
                    _ => {
                        assert_eq!(file.len() % 64, want.len() % 64, "npy data starts 64-byte aligned");
                        assert!(file.ends_with(&want));
                        if numpy {
                            let got = numpy_bytes(&path, "npy", c, d, if f16 { "float16" } else { "float32" }, &s);
                            assert!(got == want, "{}: numpy reads other values", path.display());
                        }
                    }
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 10);
    // Only the exported files: no temporary files beside them.
    assert!(listing(&s.0).iter().all(|n| n.starts_with("centers-") || n == "numpy.bin"), "{:?}", listing(&s.0));
}

#[test]
fn export_replaces_files_atomically_and_rejects_bad_arguments() {
    let (c, d) = (50, 4u32);
    let h = export_head(c, d, 2);
    let s = Scratch::new("export-args");
    let path = s.path("c.npy");
    std::fs::write(&path, b"old contents").unwrap();
    ok(export(&h, &path, PFC_FORMAT_NPY, PFC_DTYPE_F32, 0));
    assert!(std::fs::read(&path).unwrap().ends_with(&le_bytes(&h.centers(d as usize), false)));
    for (format, dtype, normalized) in [(7, PFC_DTYPE_F32, 0), (-1, PFC_DTYPE_F32, 0), (PFC_FORMAT_NPY, PFC_DTYPE_BF16, 0), (PFC_FORMAT_NPY, 9, 0), (PFC_FORMAT_NPY, PFC_DTYPE_F32, 2), (PFC_FORMAT_FVECS, PFC_DTYPE_F16, 0)] {
        let p = s.path("bad.npy");
        assert_eq!(export(&h, &p, format, dtype, normalized), PFC_ERR_INVALID_ARGUMENT, "{format} {dtype} {normalized}");
        assert!(!p.exists());
        assert!(!last_error().is_empty());
    }
    assert_eq!(pfc_export_centers(h.0, std::ptr::null(), PFC_FORMAT_NPY, PFC_DTYPE_F32, 0), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_export_centers(std::ptr::null(), cpath(&path).as_ptr(), PFC_FORMAT_NPY, PFC_DTYPE_F32, 0), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(export(&h, Path::new(""), PFC_FORMAT_NPY, PFC_DTYPE_F32, 0), PFC_ERR_INVALID_ARGUMENT);
    assert_eq!(export(&h, &s.path("no/such/dir/c.npy"), PFC_FORMAT_NPY, PFC_DTYPE_F32, 0), PFC_ERR_IO);
    // A directory in the way: nothing is written, nothing is left behind.
    std::fs::create_dir(s.path("taken")).unwrap();
    assert_eq!(export(&h, &s.path("taken"), PFC_FORMAT_NPY, PFC_DTYPE_F32, 0), PFC_ERR_IO);
    assert_eq!(listing(&s.0), vec!["c.npy".to_string(), "taken".into()]);
}

// ------------------------------------------------------------------------------------------------
// Search.

fn search(h: &TestHead, queries: &[f32], d: usize, k: u32) -> Result<(Vec<i64>, Vec<f32>), pfc_status> {
    let n = queries.len() / d;
    // Sentinels: every slot must be written.
    let mut ids = vec![-7i64; n * k as usize];
    let mut scores = vec![f32::NAN; n * k as usize];
    match pfc_search(h.0, queries.as_ptr(), n as u64, k, ids.as_mut_ptr(), scores.as_mut_ptr()) {
        PFC_OK => Ok((ids, scores)),
        s => {
            assert!(ids.iter().all(|&i| i == -7), "a failed search wrote ids");
            Err(s)
        }
    }
}

/// Cosine in float64, with the library's normalization eps (1e-12 on the norm).
/// Queries are scaled to unit norm whatever their norm (a zero query scores 0); centers as training
/// sees them, with PyTorch's eps 1e-12 on the norm.
fn cosine(q: &[f32], c: &[f32]) -> f64 {
    let dot: f64 = q.iter().zip(c).map(|(&a, &b)| a as f64 * b as f64).sum();
    let nq = q.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
    let nc = c.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
    if nq == 0.0 {
        0.0
    } else {
        dot / nq / nc
    }
}

/// Checks one query's results against a brute-force scan: the same ids in the same order (score
/// descending, exact ties by ascending id), except that two *distinct* scores within `tol` of each
/// other may swap (f32 GEMM versus float64); every score within `tol` of the float64 cosine.
#[track_caller]
fn check_against_brute_force(q: &[f32], centers: &[f32], d: usize, ids: &[i64], scores: &[f32], tol: f64) -> usize {
    let c = centers.len() / d;
    let k = ids.len();
    let exact: Vec<f64> = centers.chunks_exact(d).map(|row| cosine(q, row)).collect();
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&a, &b| exact[b].total_cmp(&exact[a]).then(a.cmp(&b)));
    let mut ties = 0;
    for i in 0..k {
        let id = ids[i];
        assert!(id >= 0 && (id as usize) < c, "id {id} out of range");
        let id = id as usize;
        assert!((scores[i] as f64 - exact[id]).abs() <= tol, "score {} of class {id}: float64 says {}", scores[i], exact[id]);
        if i > 0 {
            assert!(scores[i] < scores[i - 1] || (scores[i] == scores[i - 1] && ids[i] > ids[i - 1]), "results not sorted at {i}: {ids:?} {scores:?}");
        }
        let want = order[i];
        if id != want {
            assert!(
                exact[id] != exact[want] && (exact[id] - exact[want]).abs() <= tol,
                "rank {i}: got class {id} ({}), brute force says class {want} ({})",
                exact[id],
                exact[want]
            );
        }
        if i + 1 < c && exact[order[i]] == exact[order[i + 1]] {
            ties += 1;
        }
    }
    // Nothing left out scores above the last one returned (beyond rounding).
    let last = exact[ids[k - 1] as usize];
    let mut returned = ids.to_vec();
    returned.sort();
    for (j, &e) in exact.iter().enumerate() {
        if returned.binary_search(&(j as i64)).is_err() {
            assert!(e <= last + tol, "class {j} (cosine {e}) left out; last returned has {last}");
        }
    }
    ties
}

/// Random centers with many duplicates — exact copies and power-of-two multiples, in other blocks,
/// other shards and the last partial block — and queries that hit them.
pub(crate) fn search_problem(c: usize, d: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng(seed);
    let mut centers: Vec<f32> = (0..c * d).map(|_| rng.normal() as f32).collect();
    for _ in 0..c / 10 {
        let (from, to) = (rng.below(c as u64) as usize, rng.below(c as u64) as usize);
        let factor = [1.0f32, 1.0, 2.0, 0.25, 1024.0][rng.below(5) as usize];
        for j in 0..d {
            centers[to * d + j] = centers[from * d + j] * factor;
        }
    }
    // A few rows copied to the very end and to the start of the second block.
    for (from, to) in [(5, c - 1), (5, 1024 % c), (c - 2, 0)] {
        for j in 0..d {
            centers[to * d + j] = centers[from * d + j];
        }
    }
    let mut queries: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    for q in 0..n / 2 {
        // Half the queries are near a (possibly duplicated) center: ties at the top of the list.
        let src = rng.below(c as u64) as usize;
        for j in 0..d {
            queries[q * d + j] = centers[src * d + j] * 3.0 + if q % 4 == 0 { 0.0 } else { 0.05 * rng.normal() as f32 };
        }
    }
    (centers, queries)
}

#[test]
fn search_equals_brute_force_with_exact_ties() {
    let (c, d, n) = (3000usize, 24usize, 300usize);
    let (centers, queries) = search_problem(c, d, n, 5);
    let mut ties = 0;
    for shards in [1u32, 3] {
        let h = TestHead::new(&config(c as u64, d as u32, shards, false, 1.0));
        h.set_centers(&centers);
        for k in [1u32, 10, 37] {
            let (ids, scores) = search(&h, &queries, d, k).unwrap();
            for q in 0..n {
                let r = q * k as usize..(q + 1) * k as usize;
                ties += check_against_brute_force(&queries[q * d..(q + 1) * d], &centers, d, &ids[r.clone()], &scores[r], 2e-6);
            }
            // One query at a time gives the same answer as the batch.
            for q in [0usize, 1, 2, n - 1] {
                let (one_ids, one_scores) = search(&h, &queries[q * d..(q + 1) * d], d, k).unwrap();
                let r = q * k as usize..(q + 1) * k as usize;
                assert_eq!(one_ids, ids[r.clone()]);
                assert_eq!(bits(&one_scores), bits(&scores[r]));
            }
        }
    }
    assert!(ties > 100, "the problem should produce many exact ties, got {ties}");
}

#[test]
fn duplicate_centers_tie_exactly_and_list_ids_ascending() {
    // Every class has the same direction (different power-of-two lengths): every score ties.
    let (c, d) = (2100usize, 16usize);
    let mut rng = Rng(3);
    let base: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
    let centers: Vec<f32> = (0..c).flat_map(|i| base.iter().map(move |&v| v * [1.0f32, 2.0, 0.5, 8.0][i % 4])).collect();
    for shards in [1u32, 2, 5] {
        let h = TestHead::new(&config(c as u64, d as u32, shards, false, 1.0));
        h.set_centers(&centers);
        let queries: Vec<f32> = (0..3 * d).map(|_| rng.normal() as f32).collect();
        let k = 25;
        let (ids, scores) = search(&h, &queries, d, k).unwrap();
        for q in 0..3 {
            let row = &ids[q * k as usize..(q + 1) * k as usize];
            assert_eq!(row, (0..k as i64).collect::<Vec<_>>(), "shards {shards}: ties must list ids ascending");
            let s = &scores[q * k as usize..(q + 1) * k as usize];
            assert!(s.iter().all(|&x| x.to_bits() == s[0].to_bits()), "duplicates must score identically: {s:?}");
        }
        // All classes at once: the full list is 0..C.
        let (all, _) = search(&h, &queries[..d], d, c as u32).unwrap();
        assert_eq!(all, (0..c as i64).collect::<Vec<_>>());
    }
}

#[test]
fn search_all_classes_is_the_full_brute_force_ranking() {
    let (c, d) = (700usize, 8usize);
    let (centers, queries) = search_problem(c, d, 6, 11);
    let h = TestHead::new(&config(c as u64, d as u32, 4, false, 1.0));
    h.set_centers(&centers);
    let (ids, scores) = search(&h, &queries, d, c as u32).unwrap();
    for q in 0..6 {
        let r = q * c..(q + 1) * c;
        let mut sorted = ids[r.clone()].to_vec();
        sorted.sort();
        assert_eq!(sorted, (0..c as i64).collect::<Vec<_>>(), "every class exactly once");
        check_against_brute_force(&queries[q * d..(q + 1) * d], &centers, d, &ids[r.clone()], &scores[r], 2e-6);
    }
}

#[test]
fn search_handles_extreme_magnitudes() {
    let (c, d) = (40usize, 8usize);
    let mut rng = Rng(17);
    let mut centers: Vec<f32> = (0..c * d).map(|_| rng.normal() as f32).collect();
    // Rows near the largest norm set_centers accepts (2^62; tests/all/extreme_values.rs), and tiny rows.
    for (row, scale) in [(3usize, 1e18f32), (17, 1.5e18), (21, 1e-30), (30, 1e17)] {
        for j in 0..d {
            centers[row * d + j] *= scale;
        }
    }
    let h = TestHead::new(&config(c as u64, d as u32, 2, false, 1.0));
    h.set_centers(&centers);
    let mut queries: Vec<f32> = Vec::new();
    for src in [3usize, 17, 21, 30, 0] {
        queries.extend_from_slice(&centers[src * d..(src + 1) * d]);
    }
    queries.extend((0..d).map(|_| rng.normal() as f32 * 1e35)); // a huge query
    queries.extend((0..d).map(|_| rng.normal() as f32));
    let n = queries.len() / d;
    for k in [1u32, 5, c as u32] {
        let (ids, scores) = search(&h, &queries, d, k).unwrap();
        assert!(scores.iter().all(|s| s.is_finite() && s.abs() <= 1.0 + 1e-5), "{scores:?}");
        for q in 0..n {
            let r = q * k as usize..(q + 1) * k as usize;
            check_against_brute_force(&queries[q * d..(q + 1) * d], &centers, d, &ids[r.clone()], &scores[r], 1e-5);
        }
    }
    // A zero query: every cosine is 0, so the k smallest ids.
    let (ids, scores) = search(&h, &vec![0.0; d], d, 4).unwrap();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    assert!(scores.iter().all(|&s| s == 0.0));
}

#[test]
fn search_rejects_bad_arguments() {
    let (c, d) = (30usize, 4usize);
    let h = TestHead::new(&config(c as u64, d as u32, 3, false, 1.0));
    let q = vec![0.5f32; 2 * d];
    assert!(search(&h, &q, d, 1).is_ok());
    assert!(search(&h, &q, d, c as u32).is_ok());
    assert_eq!(search(&h, &q, d, 0), Err(PFC_ERR_INVALID_ARGUMENT));
    assert_eq!(search(&h, &q, d, c as u32 + 1), Err(PFC_ERR_INVALID_ARGUMENT));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut q2 = q.clone();
        q2[d + 1] = bad;
        assert_eq!(search(&h, &q2, d, 3), Err(PFC_ERR_INVALID_ARGUMENT), "{bad}");
        assert!(last_error().contains("row 1"), "{}", last_error());
    }
    let (mut ids, mut scores) = (vec![0i64; 8], vec![0f32; 8]);
    assert_eq!(pfc_search(h.0, q.as_ptr(), 0, 1, ids.as_mut_ptr(), scores.as_mut_ptr()), PFC_ERR_INVALID_ARGUMENT);
    // k far above C is rejected before any output is written.
    assert_eq!(pfc_search(h.0, q.as_ptr(), 1, u32::MAX, ids.as_mut_ptr(), scores.as_mut_ptr()), PFC_ERR_INVALID_ARGUMENT);
    assert_eq!(pfc_search(h.0, std::ptr::null(), 1, 1, ids.as_mut_ptr(), scores.as_mut_ptr()), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_search(h.0, q.as_ptr(), 1, 1, std::ptr::null_mut(), scores.as_mut_ptr()), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_search(h.0, q.as_ptr(), 1, 1, ids.as_mut_ptr(), std::ptr::null_mut()), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_search(std::ptr::null(), q.as_ptr(), 1, 1, ids.as_mut_ptr(), scores.as_mut_ptr()), PFC_ERR_NULL_ARGUMENT);
    // ids and scores in one buffer: rejected.
    let mut both = vec![0i64; 16];
    let p = both.as_mut_ptr();
    assert_eq!(pfc_search(h.0, q.as_ptr(), 2, 4, p, p.cast::<f32>().wrapping_add(8)), PFC_ERR_INVALID_ARGUMENT);
}
