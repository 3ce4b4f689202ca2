//! The search-only index through the C ABI (`pfc_index_open/info/search/close`): opened on every
//! export format and dtype and on a checkpoint directory, it returns exactly what `pfc_search`
//! returns on a head holding the same centers; FAISS (`faiss-cpu`) opens the `PFC_FORMAT_FAISS`
//! export and searches it equal to `pfc_search`; bad arguments and hostile files are refused with a
//! clear status and the outputs untouched; one index serves several threads at once. Also the f16
//! export's range check (issue #11, item 11).

use crate::common::*;
use crate::persist::*;
use partialfc::ffi::*;
use std::path::Path;
use std::process::Command;

const C: u64 = 5000;
const D: u32 = 24;

/// An owned index, closed on drop.
struct TestIndex(*mut pfc_index);

impl TestIndex {
    fn open(path: &Path) -> Result<TestIndex, (pfc_status, String)> {
        let mut ix = std::ptr::null_mut();
        match pfc_index_open(cpath(path).as_ptr(), &mut ix) {
            PFC_OK => Ok(TestIndex(ix)),
            s => {
                assert!(ix.is_null(), "out written on failure");
                Err((s, last_error()))
            }
        }
    }

    fn info(&self) -> (u64, u32) {
        let (mut c, mut d) = (0, 0);
        ok(pfc_index_info(self.0, &mut c, &mut d));
        (c, d)
    }

    fn search(&self, q: &[f32], k: u32) -> Result<(Vec<i64>, Vec<f32>), pfc_status> {
        let n = q.len() / D as usize;
        let (mut ids, mut scores) = (vec![-7i64; n * k as usize], vec![-7f32; n * k as usize]);
        match pfc_index_search(self.0, q.as_ptr(), n as u64, k, ids.as_mut_ptr(), scores.as_mut_ptr()) {
            PFC_OK => Ok((ids, scores)),
            s => {
                assert!(ids.iter().all(|&i| i == -7) && scores.iter().all(|&v| v == -7.0), "outputs written on failure");
                Err(s)
            }
        }
    }
}

impl Drop for TestIndex {
    fn drop(&mut self) {
        pfc_index_close(self.0);
    }
}

fn head_search(h: &TestHead, q: &[f32], k: u32) -> (Vec<i64>, Vec<f32>) {
    let n = q.len() / D as usize;
    let (mut ids, mut scores) = (vec![0i64; n * k as usize], vec![0f32; n * k as usize]);
    ok(pfc_search(h.0, q.as_ptr(), n as u64, k, ids.as_mut_ptr(), scores.as_mut_ptr()));
    (ids, scores)
}

/// A head with random centers of varied norms, some duplicated (exact ties), and queries.
fn problem(shards: u32) -> (TestHead, Vec<f32>, Vec<f32>) {
    let h = TestHead::new(&config(C, D, shards, true, 1.0));
    let mut rng = Rng(4242);
    let mut values: Vec<f32> = (0..C as usize * D as usize).map(|_| rng.normal() as f32 * 10f32.powf(rng.range(-2.0, 2.0) as f32)).collect();
    for dup in 0..20usize {
        let (from, to) = (dup * 7, C as usize - 1 - dup * 11);
        let row: Vec<f32> = values[from * D as usize..(from + 1) * D as usize].to_vec();
        values[to * D as usize..(to + 1) * D as usize].copy_from_slice(&row);
    }
    h.set_centers(&values);
    let mut queries: Vec<f32> = (0..40 * D as usize).map(|_| rng.normal() as f32).collect();
    // Some queries are centers themselves (their duplicates tie with them).
    queries[..D as usize].copy_from_slice(&values[..D as usize]);
    (h, values, queries)
}

fn export(h: &TestHead, path: &Path, format: i32, dtype: i32, normalized: i32) -> pfc_status {
    pfc_export_centers(h.0, cpath(path).as_ptr(), format, dtype, normalized)
}

fn f16_rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

fn normalized(h: &TestHead) -> Vec<f32> {
    let mut out = vec![0f32; C as usize * D as usize];
    ok(pfc_get_centers(h.0, 0, C, 1, out.as_mut_ptr()));
    out
}

#[test]
fn an_index_of_any_export_or_checkpoint_searches_as_the_head_does() {
    let (h, values, queries) = problem(3);
    let unit = normalized(&h);
    let s = Scratch::new("index");
    let formats = [(PFC_FORMAT_SAFETENSORS, "safetensors"), (PFC_FORMAT_NPY, "npy"), (PFC_FORMAT_FVECS, "fvecs"), (PFC_FORMAT_FAISS, "faiss")];
    let mut opened = 0;
    for (format, ext) in formats {
        for dtype in [PFC_DTYPE_F32, PFC_DTYPE_F16] {
            for norm in [0, 1] {
                let path = s.path(&format!("c-{dtype}-{norm}.{ext}"));
                if dtype == PFC_DTYPE_F16 && matches!(format, PFC_FORMAT_FVECS | PFC_FORMAT_FAISS) {
                    assert_eq!(export(&h, &path, format, dtype, norm), PFC_ERR_INVALID_ARGUMENT);
                    continue;
                }
                ok(export(&h, &path, format, dtype, norm));
                let ix = TestIndex::open(&path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
                assert_eq!(ix.info(), (C, D));
                // The reference: a head holding exactly the stored values.
                let stored = if norm == 1 { unit.clone() } else { values.clone() };
                let stored = if dtype == PFC_DTYPE_F16 { f16_rounded(&stored) } else { stored };
                let twin = TestHead::new(&config(C, D, 2, false, 1.0));
                twin.set_centers(&stored);
                for k in [1u32, 10, 64] {
                    let got = ix.search(&queries, k).unwrap();
                    let want = head_search(&twin, &queries, k);
                    assert_eq!(got.0, want.0, "{}: k {k}: ids", path.display());
                    assert_eq!(bits(&got.1), bits(&want.1), "{}: k {k}: scores", path.display());
                }
                opened += 1;
            }
        }
    }
    assert_eq!(opened, 12);
    // A checkpoint directory: exactly the head's own search.
    let dir = s.path("ckpt");
    ok(save(&h, &dir));
    let ix = TestIndex::open(&dir).unwrap();
    assert_eq!(ix.info(), (C, D));
    for k in [1u32, 7, C as u32] {
        let got = ix.search(&queries[..3 * D as usize], k).unwrap();
        let want = head_search(&h, &queries[..3 * D as usize], k);
        assert_eq!(got.0, want.0, "checkpoint, k {k}");
        assert_eq!(bits(&got.1), bits(&want.1), "checkpoint, k {k}");
    }
    // Duplicates tie exactly and list by ascending id.
    let (ids, scores) = ix.search(&queries[..D as usize], 2).unwrap();
    assert_eq!(ids, [0, C as i64 - 1]);
    assert_eq!(scores[0].to_bits(), scores[1].to_bits());
}

/// numpy arrays and FAISS indexes written by those libraries themselves open as well.
#[test]
fn faiss_reads_the_faiss_export_and_searches_as_pfc_search() {
    let (h, values, queries) = problem(2);
    let s = Scratch::new("faiss");
    let raw = s.path("raw.faiss");
    let unit = s.path("unit.faiss");
    ok(export(&h, &raw, PFC_FORMAT_FAISS, PFC_DTYPE_F32, 0));
    ok(export(&h, &unit, PFC_FORMAT_FAISS, PFC_DTYPE_F32, 1));
    let k = 10u32;
    let (ids, scores) = head_search(&h, &queries, k);
    let qpath = s.path("queries.f32");
    std::fs::write(&qpath, queries.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let script = r#"
import sys, numpy as np, faiss
raw, unit, qpath, k, d, out = sys.argv[1:7]
k, d = int(k), int(d)
ix = faiss.read_index(raw)
assert isinstance(ix, faiss.IndexFlatIP), type(ix)
assert ix.metric_type == faiss.METRIC_INNER_PRODUCT
ix.reconstruct_n(0, ix.ntotal).astype("<f4").tofile(out + ".raw")
u = faiss.read_index(unit)
q = np.fromfile(qpath, dtype="<f4").reshape(-1, d)
faiss.normalize_L2(q)
D, I = u.search(q, k)
I.astype("<i8").tofile(out + ".ids")
D.astype("<f4").tofile(out + ".scores")
# An index FAISS writes itself opens in partialfc.
mine = faiss.IndexFlatIP(d)
mine.add(u.reconstruct_n(0, u.ntotal))
faiss.write_index(mine, out + ".theirs")
print(ix.ntotal, ix.d)
"#;
    let out = s.path("faiss");
    let o = Command::new("python3")
        .args(["-c", script])
        .arg(&raw)
        .arg(&unit)
        .arg(&qpath)
        .args([k.to_string(), D.to_string()])
        .arg(&out)
        .output()
        .expect("cannot run python3");
    assert!(o.status.success(), "faiss (installed by scripts/setup.sh: pip install faiss-cpu) failed:\n{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), format!("{C} {D}"));
    let read = |ext: &str| std::fs::read(out.with_extension(ext)).unwrap();
    // Ids are class ids: FAISS's vector i is class i's center.
    let back: Vec<f32> = read("raw").chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(bits(&back), bits(&values));
    let f_ids: Vec<i64> = read("ids").chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    let f_scores: Vec<f32> = read("scores").chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    // FAISS's inner products over unit rows are cosines, rounded by its own BLAS: the same classes
    // (ranks may swap only between scores that agree within rounding), scores within 1e-5.
    for q in 0..queries.len() / D as usize {
        let row = q * k as usize..(q + 1) * k as usize;
        for i in row.clone() {
            assert!((f_scores[i] - scores[i]).abs() < 1e-5, "query {q}: faiss {} vs {}", f_scores[i], scores[i]);
            if f_ids[i] != ids[i] {
                let j = row.clone().find(|&j| ids[j] == f_ids[i]).unwrap_or_else(|| panic!("query {q}: faiss found class {} that pfc_search did not", f_ids[i]));
                assert!((scores[j] - scores[i]).abs() < 1e-5, "query {q}: rank {i} differs beyond rounding");
            }
        }
    }
    let theirs = TestIndex::open(&out.with_extension("theirs")).unwrap();
    assert_eq!(theirs.info(), (C, D));
    let mine = TestIndex::open(&unit).unwrap();
    let (a, b) = (theirs.search(&queries, k).unwrap(), mine.search(&queries, k).unwrap());
    assert_eq!(a.0, b.0);
    assert_eq!(bits(&a.1), bits(&b.1));
}

#[test]
fn index_arguments_and_hostile_files_are_refused() {
    let (h, _, queries) = problem(1);
    let s = Scratch::new("index-bad");
    let good = s.path("c.npy");
    ok(export(&h, &good, PFC_FORMAT_NPY, PFC_DTYPE_F32, 0));
    let mut ix = std::ptr::null_mut();
    assert_eq!(pfc_index_open(std::ptr::null(), &mut ix), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_index_open(cpath(&good).as_ptr(), std::ptr::null_mut()), PFC_ERR_NULL_ARGUMENT);
    let empty = std::ffi::CString::new("").unwrap();
    assert_eq!(pfc_index_open(empty.as_ptr(), &mut ix), PFC_ERR_INVALID_ARGUMENT);
    assert!(ix.is_null());
    assert_eq!(TestIndex::open(&s.path("missing.npy")).err().unwrap().0, PFC_ERR_IO);
    // Files that are not whole exports of finite centers.
    let bytes = std::fs::read(&good).unwrap();
    let header = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    type Make = Box<dyn Fn(&Path)>;
    let b = bytes.clone();
    let cases: Vec<(&str, Make)> = vec![
        ("empty", Box::new(|p| std::fs::write(p, b"").unwrap())),
        ("text", Box::new(|p| std::fs::write(p, b"hello, these are not centers at all").unwrap())),
        ("npy cut short", Box::new({ let b = b.clone(); move |p| std::fs::write(p, &b[..b.len() - 3]).unwrap() })),
        ("npy with a byte more", Box::new({ let b = b.clone(); move |p| { let mut v = b.clone(); v.push(0); std::fs::write(p, v).unwrap() } })),
        ("npy holding a NaN", Box::new({ let b = b.clone(); move |p| { let mut v = b.clone(); v[header + 40..header + 44].copy_from_slice(&f32::NAN.to_le_bytes()); std::fs::write(p, v).unwrap() } })),
        ("npy of float64", Box::new({ let b = b.clone(); move |p| std::fs::write(p, String::from_utf8_lossy(&b).replacen("<f4", "<f8", 1).as_bytes()).unwrap() })),
        ("npy of one dimension", Box::new({ let b = b.clone(); move |p| {
            let text = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}", C * D as u64);
            let mut v = b"\x93NUMPY\x01\x00".to_vec();
            let padded = format!("{text:<117}\n");
            v.extend_from_slice(&(padded.len() as u16).to_le_bytes());
            v.extend_from_slice(padded.as_bytes());
            v.extend_from_slice(&b[header..]);
            std::fs::write(p, v).unwrap()
        } })),
        ("npy claiming 2^40 rows", Box::new({ let b = b.clone(); move |p| std::fs::write(p, String::from_utf8_lossy(&b).replacen(&format!("({C}, "), &format!("({}, ", 1u64 << 40), 1).as_bytes()).unwrap() })),
        ("faiss with an L2 metric", Box::new(move |p| {
            let mut v = b"IxF2".to_vec();
            v.extend_from_slice(&[0u8; 60]);
            std::fs::write(p, v).unwrap()
        })),
        ("a directory without a checkpoint", Box::new(|p| std::fs::create_dir(p).unwrap())),
        ("a FIFO", Box::new(|p| { let c = cpath(p); assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0); })),
        ("a link to /dev/zero", Box::new(|p| std::os::unix::fs::symlink("/dev/zero", p).unwrap())),
    ];
    for (i, (what, make)) in cases.iter().enumerate() {
        let p = s.path(&format!("bad-{i}"));
        make(&p);
        let (st, msg) = TestIndex::open(&p).err().unwrap_or_else(|| panic!("{what}: opened"));
        assert_eq!(st, PFC_ERR_CORRUPT, "{what}: {msg}");
        assert!(!msg.is_empty());
    }
    drop(b);
    // Bad search arguments: a status, outputs untouched (checked by TestIndex::search).
    let ix = TestIndex::open(&good).unwrap();
    assert_eq!(ix.search(&queries, 0), Err(PFC_ERR_INVALID_ARGUMENT));
    assert_eq!(ix.search(&queries, C as u32 + 1), Err(PFC_ERR_INVALID_ARGUMENT));
    let mut nan = queries.clone();
    nan[D as usize + 3] = f32::NAN;
    assert_eq!(ix.search(&nan, 3), Err(PFC_ERR_INVALID_ARGUMENT));
    assert!(last_error().contains("query row 1"), "{}", last_error());
    let (mut ids, mut scores) = (vec![0i64; 3], vec![0f32; 3]);
    assert_eq!(pfc_index_search(std::ptr::null(), queries.as_ptr(), 1, 3, ids.as_mut_ptr(), scores.as_mut_ptr()), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_index_search(ix.0, std::ptr::null(), 1, 3, ids.as_mut_ptr(), scores.as_mut_ptr()), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_index_search(ix.0, queries.as_ptr(), 1, 3, std::ptr::null_mut(), scores.as_mut_ptr()), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_index_search(ix.0, queries.as_ptr(), 0, 3, ids.as_mut_ptr(), scores.as_mut_ptr()), PFC_ERR_INVALID_ARGUMENT);
    let (mut c, mut d) = (0u64, 0u32);
    assert_eq!(pfc_index_info(std::ptr::null(), &mut c, &mut d), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_index_info(ix.0, std::ptr::null_mut(), &mut d), PFC_ERR_NULL_ARGUMENT);
    assert_eq!((c, d), (0, 0));
    pfc_index_close(std::ptr::null_mut());
}

#[test]
fn one_index_serves_several_threads_at_once() {
    let (h, _, queries) = problem(2);
    let s = Scratch::new("index-threads");
    let path = s.path("c.safetensors");
    ok(export(&h, &path, PFC_FORMAT_SAFETENSORS, PFC_DTYPE_F32, 0));
    let ix = TestIndex::open(&path).unwrap();
    let want = head_search(&h, &queries, 5);
    struct Shared(*mut pfc_index);
    unsafe impl Sync for Shared {}
    let shared = Shared(ix.0);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            let (shared, queries, want) = (&shared, &queries, &want);
            scope.spawn(move || {
                for _ in 0..5 {
                    let n = queries.len() / D as usize;
                    let (mut ids, mut scores) = (vec![0i64; n * 5], vec![0f32; n * 5]);
                    ok(pfc_index_search(shared.0, queries.as_ptr(), n as u64, 5, ids.as_mut_ptr(), scores.as_mut_ptr()));
                    assert_eq!(&ids, &want.0);
                    assert_eq!(bits(&scores), bits(&want.1));
                }
            });
        }
    });
}

/// Issue #11, item 11: f16 cannot hold centers beyond ±65504; the export says so and writes nothing.
#[test]
fn an_f16_export_refuses_centers_beyond_its_range() {
    let h = TestHead::new(&config(300, 8, 2, false, 1.0));
    let mut values: Vec<f32> = (0..300 * 8).map(|i| (i % 13) as f32 - 6.0).collect();
    values[211 * 8 + 5] = -70000.0;
    h.set_centers(&values);
    let s = Scratch::new("f16-range");
    for (format, ext) in [(PFC_FORMAT_SAFETENSORS, "safetensors"), (PFC_FORMAT_NPY, "npy")] {
        let path = s.path(&format!("c.{ext}"));
        std::fs::write(&path, b"previous export").unwrap();
        assert_eq!(export(&h, &path, format, PFC_DTYPE_F16, 0), PFC_ERR_INVALID_ARGUMENT);
        let msg = last_error();
        assert!(msg.contains("class 211") && msg.contains("f16"), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), b"previous export");
        assert_eq!(listing(&s.0).len(), 1, "{:?}", listing(&s.0));
        // Normalized rows fit, and f32 holds anything.
        ok(export(&h, &path, format, PFC_DTYPE_F16, 1));
        let ix = TestIndex::open(&path).unwrap();
        assert_eq!(ix.info(), (300, 8));
        ok(export(&h, &path, format, PFC_DTYPE_F32, 0));
        std::fs::remove_file(&path).unwrap();
    }
    // 65504 itself is representable.
    values[211 * 8 + 5] = -65504.0;
    h.set_centers(&values);
    ok(export(&h, &s.path("edge.npy"), PFC_FORMAT_NPY, PFC_DTYPE_F16, 0));
}
