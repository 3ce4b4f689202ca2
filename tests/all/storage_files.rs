//! Everything that reads or writes the centers of a head storing bf16 (`storage_dtype`, SPEC §2;
//! issue #26): checkpoints saved in the stored dtype and loaded into either storage and any shard
//! count (a bf16 checkpoint exactly, an f32 one into a bf16 head rounded to nearest), training
//! resumed bit for bit, exports in f32, f16 and bf16, the search-only index over both, search, and
//! `get_centers` / `set_centers`.

use crate::persist::{Scratch, Snapshot};
use half::{bf16, f16};
use partialfc::batch::{Embeddings, GradOut, HostBatch};
use partialfc::checkpoint;
use partialfc::config::{Config, DType, OptimizerKind};
use partialfc::error::Status;
use partialfc::export::{export_centers, Format};
use partialfc::index::Index;
use partialfc::rng;
use partialfc::Head;
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

const C: u64 = 47;
const D: usize = 20;

fn config(kind: OptimizerKind, storage: DType, shards: usize) -> Config {
    let mut cfg = Config { num_classes: C, embedding_dim: D, sample_rate: 0.5, seed: 5, ..Config::default() };
    cfg.local_shards = shards;
    cfg.world_size = shards;
    cfg.storage_dtype = storage;
    cfg.optimizer.kind = kind;
    cfg.optimizer.lr = if kind == OptimizerKind::AdamW { 0.01 } else { 0.2 };
    cfg.optimizer.weight_decay = 0.01;
    cfg
}

/// A head of another seed and learning rate, trained a step: a load must replace all of it.
fn other_head(kind: OptimizerKind, storage: DType, shards: usize) -> Head {
    let mut cfg = config(kind, storage, shards);
    cfg.seed = 99;
    cfg.optimizer.lr *= 3.0;
    let mut h = Head::new(cfg).unwrap();
    train(&mut h, 50, 1);
    h
}

/// Steps `from..from + steps`, 18 rows each, split evenly over the head's shards.
fn train(head: &mut Head, from: u64, steps: u64) {
    let shards = head.config().local_shards;
    for b in from..from + steps {
        let data = crate::common::split_batch(b, 18, shards, D, C, 700);
        let inputs: Vec<HostBatch> = data.iter().map(|(e, l)| HostBatch { embeddings: Embeddings::F32(e), labels: l }).collect();
        let mut grads: Vec<Vec<f32>> = data.iter().map(|(e, _)| vec![0f32; e.len()]).collect();
        let mut outs: Vec<GradOut> = grads.iter_mut().map(|g| GradOut::F32(g)).collect();
        head.train_step(&inputs, &mut outs).unwrap();
    }
}

fn centers(head: &Head, normalized: bool) -> Vec<f32> {
    let mut out = vec![0f32; C as usize * D];
    head.get_centers(0, C, normalized, &mut out).unwrap();
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bf16_nearest(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

fn storage_name(storage: DType) -> &'static str {
    if storage == DType::BF16 { "bf16" } else { "f32" }
}

/// The head's whole state as a checkpoint of it holds it.
fn saved(head: &Head) -> Snapshot {
    let s = Scratch::new("storage-files-state");
    checkpoint::save(head, &s.0).unwrap();
    Snapshot::read(&s.0)
}

fn tensor_names(kind: OptimizerKind) -> &'static [&'static str] {
    match kind {
        OptimizerKind::Sgd => &["centers", "momentum"],
        OptimizerKind::AdamW => &["centers", "exp_avg", "exp_avg_sq"],
    }
}

/// {f32, bf16} head saved, loaded into {f32, bf16} heads of the same and another shard count:
/// every tensor as the file holds it where the head can hold it exactly, rounded to nearest (half's
/// `bf16::from_f32`) from an f32 file into a bf16 head; step counts, step, seed and learning rate
/// as saved.
#[test]
fn checkpoints_load_into_either_storage_and_any_shard_count() {
    for kind in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
        for from in [DType::F32, DType::BF16] {
            let mut src = Head::new(config(kind, from, 2)).unwrap();
            train(&mut src, 0, 4);
            let dir = Scratch::new("storage-files");
            checkpoint::save(&src, &dir.0).unwrap();
            let file = Snapshot::read(&dir.0);
            assert_eq!(file.manifest["storage_dtype"], storage_name(from));
            // Format 3 for bf16 state, which versions before bf16 storage refuse as newer; f32
            // state stays format 2, which they read.
            assert_eq!(file.manifest["format_version"], if from == DType::BF16 { 3 } else { 2 });
            // Stored as is: BF16 tensors of 2 bytes a value for a bf16 head, F32 ones otherwise.
            for &name in tensor_names(kind) {
                let (dtype, size) = if from == DType::BF16 { (Dtype::BF16, 2) } else { (Dtype::F32, 4) };
                assert_eq!(file.dtypes[name], dtype, "{kind:?} {from:?}: {name}");
                assert_eq!(file.tensors[name].len(), C as usize * D * size, "{kind:?} {from:?}: {name}");
            }
            if kind == OptimizerKind::AdamW {
                assert_eq!(file.dtypes["steps"], Dtype::U32);
            }
            assert_eq!(bits(&file.f32("centers")), bits(&centers(&src, false)), "{kind:?} {from:?}: the file's centers are the head's");
            for into in [DType::F32, DType::BF16] {
                let rounds = from == DType::F32 && into == DType::BF16;
                for shards in [2, 3] {
                    let what = format!("{kind:?}: {from:?} checkpoint into a {into:?} head of {shards} shards");
                    let mut dst = other_head(kind, into, shards);
                    checkpoint::load(&mut dst, &dir.0).unwrap();
                    let got = saved(&dst);
                    for &name in tensor_names(kind) {
                        let want = if rounds { bf16_nearest(&file.f32(name)) } else { file.f32(name) };
                        assert_eq!(bits(&got.f32(name)), bits(&want), "{what}: {name}");
                        if rounds && name == "centers" {
                            let moved = want.iter().zip(file.f32(name)).filter(|(w, f)| w.to_bits() != f.to_bits()).count();
                            assert!(moved > want.len() / 2, "{what}: only {moved} values needed rounding");
                        }
                    }
                    assert_eq!(bits(&centers(&dst, false)), bits(&got.f32("centers")), "{what}: get_centers");
                    if kind == OptimizerKind::AdamW {
                        assert_eq!(got.u32("steps"), file.u32("steps"), "{what}: step counts");
                    }
                    for key in ["step", "seed", "lr"] {
                        assert_eq!(got.manifest[key], file.manifest[key], "{what}: {key}");
                    }
                    assert_eq!(got.manifest["storage_dtype"], storage_name(into), "{what}: saved again in its own storage");
                }
            }
        }
    }
}

/// A bf16 checkpoint loaded into another bf16 head continues exactly as the head that saved it:
/// the stochastic rounding's draws follow the restored step count and seed.
#[test]
fn bf16_training_resumes_bit_for_bit() {
    for kind in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
        let mut a = Head::new(config(kind, DType::BF16, 2)).unwrap();
        train(&mut a, 0, 3);
        let dir = Scratch::new("storage-resume");
        checkpoint::save(&a, &dir.0).unwrap();
        // A head of another seed (the PyTorch drop-in's default seed differs between processes),
        // trained elsewhere first: the checkpoint's seed keys the rounding from the load on.
        let mut b = other_head(kind, DType::BF16, 2);
        checkpoint::load(&mut b, &dir.0).unwrap();
        train(&mut a, 3, 4);
        train(&mut b, 3, 4);
        let (sa, sb) = (saved(&a), saved(&b));
        assert_eq!(sa.state(), sb.state(), "{kind:?}: resumed training differs from training that never stopped");
        assert_eq!(sa.manifest["step"], 7);
    }
}

fn read_export(path: &Path) -> (Dtype, Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("centers").unwrap();
    (t.dtype(), t.shape().to_vec(), t.data().to_vec())
}

/// A bf16 head exports f32 (its widened values), f16 (their nearest f16) and bf16 (its stored bits,
/// unnormalized; normalized, the nearest bf16 of the unit rows) as safetensors; numpy's .npy and
/// .fvecs/FAISS refuse bf16 and write nothing. The index reads the bf16 export and the bf16
/// checkpoint and finds what the head finds.
#[test]
fn exports_of_a_bf16_head() {
    let mut h = Head::new(config(OptimizerKind::Sgd, DType::BF16, 3)).unwrap();
    train(&mut h, 0, 3);
    let s = Scratch::new("storage-export");
    for normalized in [false, true] {
        let values = centers(&h, normalized);
        let cases: [(DType, Dtype, Vec<u8>); 3] = [
            (DType::F32, Dtype::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            (DType::F16, Dtype::F16, values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect()),
            (DType::BF16, Dtype::BF16, values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect()),
        ];
        for (dtype, file_dtype, want) in cases {
            let path = s.path(&format!("c-{dtype:?}-{normalized}.safetensors"));
            export_centers(&h, &path, Format::Safetensors, dtype, normalized).unwrap();
            let (got_dtype, shape, data) = read_export(&path);
            assert_eq!((got_dtype, shape), (file_dtype, vec![C as usize, D]), "{dtype:?} normalized {normalized}");
            assert_eq!(data, want, "{dtype:?} normalized {normalized}");
        }
    }
    // Unnormalized, the bf16 export is the stored bits: the high halves of the widened values.
    let stored: Vec<u8> = centers(&h, false).iter().flat_map(|v| {
        assert_eq!(v.to_bits() & 0xFFFF, 0, "a bf16 head's center is not a bf16");
        ((v.to_bits() >> 16) as u16).to_le_bytes()
    }).collect();
    assert_eq!(read_export(&s.path("c-BF16-false.safetensors")).2, stored);
    for (format, name, says) in [(Format::Npy, "c.npy", "numpy"), (Format::Fvecs, "c.fvecs", "f32"), (Format::Faiss, "c.faiss", "f32")] {
        let err = export_centers(&h, &s.path(name), format, DType::BF16, false).unwrap_err();
        assert_eq!(err.status, Status::InvalidArgument, "{name}");
        assert!(err.message.contains(says), "{name}: {}", err.message);
        assert!(!s.path(name).exists(), "{name} was written");
    }
    // The search-only index over the bf16 export and over a bf16 checkpoint finds what the head finds.
    let dir = s.path("ckpt");
    checkpoint::save(&h, &dir).unwrap();
    let queries = random_rows(9, 31);
    let (ids, scores) = h.search(&queries, 4).unwrap();
    for path in [s.path("c-BF16-false.safetensors"), dir] {
        let index = Index::open(&path).unwrap();
        assert_eq!((index.classes(), index.dim()), (C, D));
        let (i2, s2) = index.search(&queries, 4).unwrap();
        assert_eq!(i2, ids, "{}", path.display());
        assert_eq!(bits(&s2), bits(&scores), "{}", path.display());
    }
}

fn random_rows(rows: usize, seed: u64) -> Vec<f32> {
    let mut q = vec![0f32; rows * D];
    for (r, row) in q.chunks_exact_mut(D).enumerate() {
        rng::init_center(seed, r as u64, 1.0, row);
    }
    q
}

/// Search on a bf16 head is search over its widened centers: the same ids and scores as an f32
/// head holding them, and the top k of a float64 brute force over them.
#[test]
fn search_on_a_bf16_head_is_search_over_its_widened_centers() {
    let mut h = Head::new(config(OptimizerKind::AdamW, DType::BF16, 3)).unwrap();
    train(&mut h, 0, 5);
    let widened = centers(&h, false);
    let mut twin = Head::new(config(OptimizerKind::AdamW, DType::F32, 2)).unwrap();
    twin.set_centers(0, C, &widened).unwrap();
    let k = 6;
    let queries = random_rows(17, 3);
    let (ids, scores) = h.search(&queries, k).unwrap();
    let (twin_ids, twin_scores) = twin.search(&queries, k).unwrap();
    assert_eq!(ids, twin_ids);
    assert_eq!(bits(&scores), bits(&twin_scores));
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    for (q, query) in queries.chunks_exact(D).enumerate() {
        let mut all: Vec<(f64, i64)> = widened
            .chunks_exact(D)
            .enumerate()
            .map(|(c, row)| (query.iter().zip(row).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / (norm(query) * norm(row)), c as i64))
            .collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for j in 0..k {
            let (id, score) = (ids[q * k + j], scores[q * k + j] as f64);
            let exact = all.iter().find(|p| p.1 == id).unwrap().0;
            assert!((score - exact).abs() < 1e-5, "query {q}, rank {j}: score {score}, float64 {exact}");
            // Ranks may swap only between cosines that f32 cannot tell apart.
            assert!((exact - all[j].0).abs() < 1e-5, "query {q}, rank {j}: class {id} ({exact}), float64 ranks class {} ({}) there", all[j].1, all[j].0);
        }
    }
}

/// set_centers on a bf16 head keeps the values rounded to nearest and resets those rows'
/// optimizer state; get_centers gives back exactly what is stored; a row whose norm only the
/// rounding takes above the bound is refused, as a checkpoint of it would be.
#[test]
fn get_and_set_centers_on_a_bf16_head() {
    let mut h = Head::new(config(OptimizerKind::Sgd, DType::BF16, 2)).unwrap();
    train(&mut h, 0, 3);
    let before = saved(&h);
    let values: Vec<f32> = (0..10 * D).map(|i| (i as f32 * 0.731 - 40.0) * 1.000_123).collect();
    let rounded = bf16_nearest(&values);
    assert!(rounded.iter().zip(&values).filter(|(r, v)| r != v).count() > values.len() / 2);
    h.set_centers(20, 10, &values).unwrap();
    let after = centers(&h, false);
    assert_eq!(bits(&after[20 * D..30 * D]), bits(&rounded), "set_centers rounds to nearest");
    assert_eq!(bits(&after[..20 * D]), bits(&before.f32("centers")[..20 * D]), "other rows changed");
    assert_eq!(bits(&after[30 * D..]), bits(&before.f32("centers")[30 * D..]), "other rows changed");
    let momentum = saved(&h).f32("momentum");
    assert!(momentum[20 * D..30 * D].iter().all(|&m| m == 0.0), "the rows' momentum was not reset");
    assert_eq!(bits(&momentum[..20 * D]), bits(&before.f32("momentum")[..20 * D]));
    // Values bf16 holds are kept exactly.
    h.set_centers(20, 10, &rounded).unwrap();
    assert_eq!(bits(&centers(&h, false)[20 * D..30 * D]), bits(&rounded));

    // Two values whose f32 row has norm at most 2^62 but whose nearest bf16 values do not.
    let bound = 2f64.powi(62);
    let norm = |a: f32, b: f32| (a as f64 * a as f64 + b as f64 * b as f64).sqrt();
    // Search a few thousand first values for one where both values round up far enough.
    let largest_b = |a: f32| {
        let mut b = ((bound * bound - a as f64 * a as f64).sqrt()) as f32;
        while norm(a, b) > bound {
            b = f32::from_bits(b.to_bits() - 1);
        }
        b
    };
    let (a, b) = (0..4096u32)
        .map(|i| f32::from_bits(2f32.powi(61).to_bits() + i * 997))
        .map(|a| (a, largest_b(a)))
        .find(|&(a, b)| norm(bf16::from_f32(a).to_f32(), bf16::from_f32(b).to_f32()) > bound)
        .expect("a row that only the rounding takes above the bound");
    assert!(norm(a, b) <= bound);
    let mut row = vec![0f32; D];
    row[0] = a;
    row[1] = b;
    let kept = centers(&h, false);
    let err = h.set_centers(5, 1, &row).unwrap_err();
    assert_eq!(err.status, Status::InvalidArgument);
    assert!(err.message.contains("class 5") && err.message.contains("norm"), "{}", err.message);
    assert_eq!(bits(&centers(&h, false)), bits(&kept), "a refused set_centers changed the head");
    // An f32 head takes the row as it is.
    let mut f32_head = Head::new(config(OptimizerKind::Sgd, DType::F32, 2)).unwrap();
    f32_head.set_centers(5, 1, &row).unwrap();
}
