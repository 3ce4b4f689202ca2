//! Checkpoints through the C ABI: round trips into other shard counts (centers and all optimizer
//! state, read back with the safetensors crate), training resumed from a checkpoint against an
//! uninterrupted run, damaged checkpoints (truncated, altered, missing files, bad manifests) rejected
//! with PFC_ERR_CORRUPT leaving the head bit-identical, and the other error statuses.

use crate::common::*;
use crate::persist::*;
use partialfc::ffi::*;
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

const C: u64 = 37;
const D: usize = 12;

fn head(shards: u32, adamw: bool, rate: f32) -> TestHead {
    TestHead::new(&config(C, D as u32, shards, adamw, rate))
}

/// A head with other seed, learning rate and centers than `head`, storing `storage`, to load into.
fn other_head(shards: u32, adamw: bool, rate: f32, storage: i32) -> TestHead {
    let mut cfg = config(C, D as u32, shards, adamw, rate);
    cfg.storage_dtype = storage;
    cfg.seed = 999;
    cfg.lr = 0.7;
    let h = TestHead::new(&cfg);
    train(&h, C, D, shards as usize, 100, 1);
    h
}

fn set_lr(h: &TestHead, lr: f32) {
    ok(pfc_set_learning_rate(h.0, lr));
}

#[test]
fn save_writes_the_documented_layout() {
    for adamw in [false, true] {
        let h = head(3, adamw, 0.5);
        train(&h, C, D, 3, 0, 4);
        set_lr(&h, 0.0371);
        let s = Scratch::new("layout");
        ok(save(&h, &s.0));
        assert_clean(&s.0);
        // One JSON document: the inner object and its checksum over the inner object's bytes.
        let text = std::fs::read(s.path("manifest.json")).unwrap();
        let whole: serde_json::Value = serde_json::from_slice(&text).unwrap();
        let body = manifest_body(&text);
        assert_eq!(whole["checksum"], format!("crc32:{:08x}", crc32fast::hash(body)));
        assert_eq!(manifest_file(body), text);
        let m = read_manifest(&s.0);
        assert_eq!(serde_json::from_slice::<serde_json::Value>(body).unwrap(), m);
        assert_eq!(m["format"], "partialfc-checkpoint");
        assert_eq!(m["format_version"], 2);
        assert_eq!(m["num_classes"], C);
        assert_eq!(m["embedding_dim"], D as u64);
        assert_eq!(m["optimizer"], if adamw { "adamw" } else { "sgd" });
        assert_eq!(m["storage_dtype"], "f32");
        assert_eq!(m["step"], 4);
        assert_eq!(m["seed"], 1234);
        assert_eq!(m["lr"].as_f64().unwrap() as f32, 0.0371f32);
        let shards = m["shards"].as_array().unwrap();
        assert_eq!(shards.len(), 3);
        let mut next = 0;
        for (r, sh) in shards.iter().enumerate() {
            assert_eq!(sh["rank"], r as u64);
            assert_eq!(sh["start"], next);
            let len = sh["len"].as_u64().unwrap();
            next += len;
            let bytes = std::fs::read(s.path(sh["file"].as_str().unwrap())).unwrap();
            assert_eq!(sh["bytes"], bytes.len() as u64);
            assert_eq!(sh["crc32"], crc32fast::hash(&bytes) as u64);
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let mut names = st.names();
            names.sort();
            let want: &[&str] = if adamw { &["centers", "exp_avg", "exp_avg_sq", "steps"] } else { &["centers", "momentum"] };
            assert_eq!(names, want);
            for (name, t) in st.tensors() {
                if name == "steps" {
                    assert_eq!((t.dtype(), t.shape()), (Dtype::U32, &[len as usize][..]));
                } else {
                    assert_eq!((t.dtype(), t.shape()), (Dtype::F32, &[len as usize, D][..]));
                }
            }
        }
        assert_eq!(next, C);
        // The shard files hold exactly the head's centers, and the optimizer state is not trivial.
        let snap = Snapshot::read(&s.0);
        assert_eq!(bits(&snap.f32("centers")), bits(&h.centers(D)));
        let moment = if adamw { "exp_avg_sq" } else { "momentum" };
        assert!(snap.f32(moment).iter().filter(|v| **v != 0.0).count() > C as usize * D / 4);
        if adamw {
            let steps = snap.u32("steps");
            assert!(steps.contains(&4) && steps.iter().any(|&s| s > 0 && s < 4), "{steps:?}");
        }
    }
}

#[test]
fn round_trips_into_other_shard_counts_keep_all_state() {
    for adamw in [false, true] {
        let h3 = head(3, adamw, 0.5);
        train(&h3, C, D, 3, 0, 5);
        set_lr(&h3, 0.0371);
        let a = Scratch::new("reshard-a");
        ok(save(&h3, &a.0));
        let original = Snapshot::read(&a.0);
        assert_eq!(original.shards, 3);
        for shards in [1u32, 2, 5] {
            let h = other_head(shards, adamw, 0.5, PFC_DTYPE_F32);
            assert_ne!(bits(&h.centers(D)), bits(&h3.centers(D)));
            ok(load(&h, &a.0));
            assert_eq!(bits(&h.centers(D)), bits(&h3.centers(D)), "centers after loading into {shards} shards");
            // Save again with this layout: every tensor, the step, seed and learning rate identical.
            let b = Scratch::new("reshard-b");
            ok(save(&h, &b.0));
            let again = Snapshot::read(&b.0);
            assert_eq!(again.shards, shards as usize);
            assert_eq!(again.state(), original.state(), "adamw {adamw}, {shards} shards");
            // And back into three shards.
            let back = other_head(3, adamw, 0.5, PFC_DTYPE_F32);
            ok(load(&back, &b.0));
            assert_eq!(state_of(&back), original.state());
            // The step counter continues from the checkpoint.
            let stats = train(&h, C, D, shards as usize, 5, 1);
            assert_eq!(stats[0].step, 6);
        }
    }
}

/// Steps 0..6 uninterrupted versus 0..3, save, load into a fresh head, 3..6.
#[test]
fn resumed_training_is_bit_identical_with_the_same_layout() {
    for adamw in [false, true] {
        let straight = head(3, adamw, 0.5);
        train(&straight, C, D, 3, 0, 3);
        set_lr(&straight, 0.05);
        let mut want = Vec::new();
        for i in 3..6 {
            let (emb, labels) = batch(C, D, 12, i);
            want.push(straight.step(&emb, &labels, D, &even_split(12, 3)));
        }

        let first = head(3, adamw, 0.5);
        train(&first, C, D, 3, 0, 3);
        set_lr(&first, 0.05);
        let s = Scratch::new("resume");
        ok(save(&first, &s.0));
        drop(first);
        // Other seed and learning rate in the configuration: both come from the checkpoint.
        let resumed = other_head(3, adamw, 0.5, PFC_DTYPE_F32);
        ok(load(&resumed, &s.0));
        for (i, (want_stats, want_grad)) in (3..6).zip(&want) {
            let (emb, labels) = batch(C, D, 12, i);
            let (stats, grad) = resumed.step(&emb, &labels, D, &even_split(12, 3));
            assert_eq!(stats.loss.to_bits(), want_stats.loss.to_bits(), "step {i}");
            assert_eq!((stats.step, stats.sampled_classes), (want_stats.step, want_stats.sampled_classes));
            assert_eq!(bits(&grad), bits(want_grad), "gradients at step {i}");
        }
        assert_eq!(bits(&resumed.centers(D)), bits(&straight.centers(D)));
        assert_eq!(state_of(&resumed), state_of(&straight), "adamw {adamw}: all optimizer state");
    }
}

/// At r = 1 every layout computes the same step up to f32 rounding, so a checkpoint resumed on
/// another shard count continues the same run.
#[test]
fn resumed_training_on_another_layout_matches_within_rounding() {
    for adamw in [false, true] {
        let straight = head(3, adamw, 1.0);
        train(&straight, C, D, 3, 0, 6);
        let first = head(3, adamw, 1.0);
        train(&first, C, D, 3, 0, 3);
        let s = Scratch::new("relayout");
        ok(save(&first, &s.0));
        for shards in [1u32, 2, 5] {
            let resumed = other_head(shards, adamw, 1.0, PFC_DTYPE_F32);
            ok(load(&resumed, &s.0));
            let stats = train(&resumed, C, D, shards as usize, 3, 3);
            assert_eq!(stats[2].step, 6);
            let (got, want) = (resumed.centers(D), straight.centers(D));
            let err = rel_err(&got, &want);
            assert!(err < 1e-6, "adamw {adamw}, {shards} shards: relative error {err}");
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
            assert!(worst <= 2e-6 * scale, "adamw {adamw}, {shards} shards: max difference {worst}");
        }
    }
}

#[test]
fn repeated_saves_replace_the_checkpoint_and_leave_only_its_files() {
    let s = Scratch::new("repeat");
    let h = head(3, true, 0.5);
    for i in 0..3 {
        train(&h, C, D, 3, i, 1);
        ok(save(&h, &s.0));
        assert_clean(&s.0);
        assert_eq!(listing(&s.0).len(), 5);
    }
    // Another layout into the same directory.
    let h5 = other_head(5, true, 0.5, PFC_DTYPE_F32);
    ok(load(&h5, &s.0));
    train(&h5, C, D, 5, 3, 1);
    ok(save(&h5, &s.0));
    assert_clean(&s.0);
    assert_eq!(listing(&s.0).len(), 7);
    let check = other_head(2, true, 0.5, PFC_DTYPE_F32);
    ok(load(&check, &s.0));
    assert_eq!(bits(&check.centers(D)), bits(&h5.centers(D)));
    // Files the library did not write are not its to delete, however they are named (issue #11,
    // item 8); what a crashed save left is removed (tests/all/checkpoint_faults.rs kills real savers).
    let foreign = [
        "shard-my-notes.safetensors",
        "shard-embeddings-backbone.safetensors",
        ".manifest.json.tmp-keep",
        "shard-00000000deadbeef-00000.safetensors",
        ".shard-1-00001.safetensors.tmp-77-3",
        ".manifest.json.tmp-77-4",
        "notes.txt",
    ];
    for f in foreign {
        std::fs::write(s.path(f), f.as_bytes()).unwrap();
    }
    for round in 0..2 {
        ok(save(&h5, &s.0));
        for f in foreign {
            assert_eq!(std::fs::read(s.path(f)).unwrap(), f.as_bytes(), "round {round}: {f}");
        }
        let mut names = listing(&s.0);
        names.retain(|n| !foreign.contains(&n.as_str()));
        assert_eq!(names.len(), 7, "{names:?}");
    }
    // A manifest of a checkpoint written elsewhere names its files: a save replacing it removes them,
    // and nothing else.
    let other = Scratch::new("repeat-other");
    let h2 = other_head(2, true, 0.5, PFC_DTYPE_F32);
    ok(save(&h2, &other.0));
    let theirs: Vec<String> = read_manifest(&other.0)["shards"].as_array().unwrap().iter().map(|s| s["file"].as_str().unwrap().to_string()).collect();
    for f in theirs.iter().chain(["manifest.json".to_string()].iter()) {
        std::fs::copy(other.path(f), s.path(f)).unwrap();
    }
    ok(save(&h5, &s.0));
    for f in &theirs {
        assert!(!s.path(f).exists(), "{f} of the replaced manifest is left");
    }
    for f in foreign {
        assert_eq!(std::fs::read(s.path(f)).unwrap(), f.as_bytes(), "{f}");
    }
}

// ------------------------------------------------------------------------------------------------
// Damage.

/// A trained AdamW checkpoint with three shards (AdamW: every kind of tensor, steps included) of a
/// head storing `storage` (a PFC_DTYPE_*).
fn good_checkpoint(storage: i32) -> (Scratch, Vec<String>) {
    let mut cfg = config(C, D as u32, 3, true, 0.5);
    cfg.storage_dtype = storage;
    let h = TestHead::new(&cfg);
    train(&h, C, D, 3, 0, 3);
    let s = Scratch::new("good");
    ok(save(&h, &s.0));
    let files = read_manifest(&s.0)["shards"].as_array().unwrap().iter().map(|s| s["file"].as_str().unwrap().to_string()).collect();
    (s, files)
}

fn rewrite(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

/// A shard file's tensors: name, dtype, shape, bytes.
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// Rebuilds shard file `path` with `edit` applied to its tensors.
fn rebuild_shard(path: &Path, edit: impl Fn(&mut Tensors)) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors =
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, dt, shape, data)| (n.clone(), safetensors::tensor::TensorView::new(*dt, shape.clone(), data).unwrap()))
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, out).unwrap();
}

type Damage = Box<dyn Fn(&Path, &[String])>;

/// Bytes per value of a state tensor of `dtype`.
fn value_bytes(dtype: Dtype) -> usize {
    match dtype {
        Dtype::BF16 | Dtype::F16 => 2,
        _ => 4,
    }
}

/// Value `i` of tensor `name` set to `value`, encoded as the tensor's dtype stores it.
fn set_value(t: &mut Tensors, name: &str, i: usize, value: f32) {
    let x = t.iter_mut().find(|x| x.0 == name).unwrap();
    let bytes = match x.1 {
        Dtype::BF16 => half::bf16::from_f32(value).to_le_bytes().to_vec(),
        _ => value.to_le_bytes().to_vec(),
    };
    x.3[i * bytes.len()..(i + 1) * bytes.len()].copy_from_slice(&bytes);
}

/// A float tensor converted to the other storage dtype (F32 ↔ BF16).
fn convert(x: &mut (String, Dtype, Vec<usize>, Vec<u8>)) {
    if x.1 == Dtype::BF16 {
        x.3 = x.3.chunks_exact(2).flat_map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32().to_le_bytes()).collect();
        x.1 = Dtype::F32;
    } else {
        x.3 = x.3.chunks_exact(4).flat_map(|b| half::bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes()).collect();
        x.1 = Dtype::BF16;
    }
}

/// Every damage and the status its load must give, for a checkpoint of a head storing `storage`.
fn damages(storage: i32) -> Vec<(String, Damage, pfc_status)> {
    let mut v: Vec<(String, Damage, pfc_status)> = Vec::new();
    let corrupt = PFC_ERR_CORRUPT;
    for r in 0..3usize {
        v.push((format!("shard {r} missing"), Box::new(move |d, f| std::fs::remove_file(d.join(&f[r])).unwrap()), corrupt));
        for (what, cut) in [("emptied", 0usize), ("cut to 8 bytes", 8), ("cut in its header", 40), ("cut in half", usize::MAX), ("missing its last byte", usize::MAX - 1)] {
            v.push((
                format!("shard {r} {what}"),
                Box::new(move |d, f| {
                    rewrite(&d.join(&f[r]), |b| {
                        let n = match cut {
                            usize::MAX => b.len() / 2,
                            x if x == usize::MAX - 1 => b.len() - 1,
                            x => x,
                        };
                        b.truncate(n)
                    })
                }),
                corrupt,
            ));
        }
        for (what, at) in [("header length", 0usize), ("header", 30), ("centers", usize::MAX), ("last value", usize::MAX - 1)] {
            v.push((
                format!("shard {r}: one byte of its {what} altered"),
                Box::new(move |d, f| {
                    rewrite(&d.join(&f[r]), |b| {
                        let i = match at {
                            usize::MAX => b.len() / 3,
                            x if x == usize::MAX - 1 => b.len() - 1,
                            x => x,
                        };
                        b[i] ^= 0x04;
                    })
                }),
                corrupt,
            ));
        }
        v.push((format!("shard {r}: a byte appended"), Box::new(move |d, f| rewrite(&d.join(&f[r]), |b| b.push(0))), corrupt));
        v.push((format!("shard {r}: a byte inserted"), Box::new(move |d, f| rewrite(&d.join(&f[r]), |b| b.insert(100, b' '))), corrupt));
    }
    v.push(("shards 0 and 1 swapped".into(), Box::new(|d, f| {
        let tmp = d.join("swap");
        std::fs::rename(d.join(&f[0]), &tmp).unwrap();
        std::fs::rename(d.join(&f[1]), d.join(&f[0])).unwrap();
        std::fs::rename(&tmp, d.join(&f[1])).unwrap();
    }), corrupt));
    v.push(("a shard replaced by a directory".into(), Box::new(|d, f| {
        std::fs::remove_file(d.join(&f[1])).unwrap();
        std::fs::create_dir(d.join(&f[1])).unwrap();
    }), corrupt));
    // The manifest.
    v.push(("manifest missing".into(), Box::new(|d, _| std::fs::remove_file(d.join("manifest.json")).unwrap()), corrupt));
    v.push(("manifest empty".into(), Box::new(|d, _| std::fs::write(d.join("manifest.json"), b"").unwrap()), corrupt));
    v.push(("manifest cut in half".into(), Box::new(|d, _| rewrite(&d.join("manifest.json"), |b| b.truncate(b.len() / 2))), corrupt));
    v.push(("manifest without its last newline".into(), Box::new(|d, _| rewrite(&d.join("manifest.json"), |b| { b.pop(); })), corrupt));
    v.push(("manifest pretty-printed".into(), Box::new(|d, _| rewrite(&d.join("manifest.json"), |b| {
        let v: serde_json::Value = serde_json::from_slice(b).unwrap();
        *b = serde_json::to_vec_pretty(&v).unwrap();
    })), corrupt));
    v.push(("manifest with its keys in another order".into(), Box::new(|d, _| rewrite(&d.join("manifest.json"), |b| {
        let v: serde_json::Value = serde_json::from_slice(b).unwrap();
        *b = format!("{{\"manifest\":{},\"checksum\":{}}}\n", v["manifest"], v["checksum"]).into_bytes();
    })), corrupt));
    v.push(("manifest without its checksum".into(), Box::new(|d, _| rewrite(&d.join("manifest.json"), |b| {
        let v: serde_json::Value = serde_json::from_slice(b).unwrap();
        *b = format!("{{\"manifest\":{}}}\n", v["manifest"]).into_bytes();
    })), corrupt));
    v.push(("manifest with a line appended".into(), Box::new(|d, _| rewrite(&d.join("manifest.json"), |b| b.extend_from_slice(b"x\n"))), corrupt));
    v.push(("manifest with a space inside".into(), Box::new(|d, _| rewrite(&d.join("manifest.json"), |b| b.insert(60, b' '))), corrupt));
    v.push(("manifest checksum in upper case".into(), Box::new(|d, _| rewrite(&d.join("manifest.json"), |b| {
        let body = manifest_body(b).to_vec();
        // The same value in upper case (or with a '+', which hex parsers accept, when it has no
        // letters): not what `save` writes.
        let crc = crc32fast::hash(&body);
        let mut out = format!("{{\"checksum\":\"crc32:{crc:08X}\",\"manifest\":").into_bytes();
        if format!("{crc:08X}") == format!("{crc:08x}") {
            out.insert(19, b'+');
        }
        out.extend_from_slice(&body);
        out.extend_from_slice(b"}\n");
        *b = out;
    })), corrupt));
    v.push(("manifest: one digit of the step altered".into(), Box::new(|d, _| rewrite(&d.join("manifest.json"), |b| {
        let s = String::from_utf8(b.clone()).unwrap();
        let i = s.find("\"step\":").unwrap() + 7;
        b[i] = if b[i] == b'9' { b'8' } else { b[i] + 1 };
    })), corrupt));
    v.push(("manifest not UTF-8".into(), Box::new(|d, _| rewrite(&d.join("manifest.json"), |b| b[25] = 0xff)), corrupt));
    // Manifests with a correct checksum but wrong contents.
    let edit = |f: fn(&mut serde_json::Value)| -> Damage {
        Box::new(move |d: &Path, _: &[String]| {
            let mut m = read_manifest(d);
            f(&mut m);
            write_manifest(d, &m);
        })
    };
    v.push(("manifest: not JSON".into(), Box::new(|d, _| std::fs::write(d.join("manifest.json"), manifest_file(b"{not json")).unwrap()), corrupt));
    v.push(("manifest: format 1's layout, not ours".into(), Box::new(|d, _| {
        let body = "{\"format\":\"something-else\",\"format_version\":1}";
        std::fs::write(d.join("manifest.json"), format!("{body}\ncrc32 {:08x}\n", crc32fast::hash(body.as_bytes()))).unwrap();
    }), corrupt));
    v.push(("manifest: other format".into(), edit(|m| m["format"] = "something-else".into()), corrupt));
    v.push(("manifest: no shard table".into(), edit(|m| { m.as_object_mut().unwrap().remove("shards"); }), corrupt));
    v.push(("manifest: no step".into(), edit(|m| { m.as_object_mut().unwrap().remove("step"); }), corrupt));
    v.push(("manifest: negative step".into(), edit(|m| m["step"] = (-1).into()), corrupt));
    v.push(("manifest: lr is a string".into(), edit(|m| m["lr"] = "0.1".into()), corrupt));
    v.push(("manifest: negative lr".into(), edit(|m| m["lr"] = (-0.5).into()), corrupt));
    // Values the head's own setters refuse (issue #11, item 4): the same validator decides.
    v.push(("manifest: lr 1e300 (infinite in f32)".into(), edit(|m| m["lr"] = 1e300.into()), corrupt));
    v.push(("manifest: lr 1e30 (above pfc_set_learning_rate's limit)".into(), edit(|m| m["lr"] = 1e30.into()), corrupt));
    v.push(("manifest: step 2^64 - 1".into(), edit(|m| m["step"] = u64::MAX.into()), corrupt));
    v.push(("manifest: step 2^31".into(), edit(|m| m["step"] = (1u64 << 31).into()), corrupt));
    v.push(("manifest: optimizer missing".into(), edit(|m| { m.as_object_mut().unwrap().remove("optimizer"); }), corrupt));
    v.push(("manifest: a shard dropped".into(), edit(|m| { m["shards"].as_array_mut().unwrap().pop(); }), corrupt));
    v.push(("manifest: shard ranges overlap".into(), edit(|m| m["shards"][1]["start"] = 1.into()), corrupt));
    v.push(("manifest: an empty shard".into(), edit(|m| {
        let sh = m["shards"].as_array_mut().unwrap();
        let mut extra = sh[2].clone();
        extra["start"] = C.into();
        extra["len"] = 0.into();
        sh.push(extra);
    }), corrupt));
    v.push(("manifest: shard length overflows".into(), edit(|m| m["shards"][2]["len"] = u64::MAX.into()), corrupt));
    v.push(("manifest: a file outside the checkpoint".into(), edit(|m| m["shards"][0]["file"] = "../good.safetensors".into()), corrupt));
    v.push(("manifest: a hidden file".into(), edit(|m| m["shards"][0]["file"] = ".hidden".into()), corrupt));
    v.push(("manifest: an empty file name".into(), edit(|m| m["shards"][0]["file"] = "".into()), corrupt));
    v.push(("manifest: the manifest as a shard".into(), edit(|m| m["shards"][0]["file"] = "manifest.json".into()), corrupt));
    v.push(("manifest: wrong shard size".into(), edit(|m| m["shards"][1]["bytes"] = (m["shards"][1]["bytes"].as_u64().unwrap() + 4).into()), corrupt));
    v.push(("manifest: wrong shard checksum".into(), edit(|m| m["shards"][1]["crc32"] = (m["shards"][1]["crc32"].as_u64().unwrap() ^ 1).into()), corrupt));
    v.push(("manifest: checksum beyond 32 bits".into(), edit(|m| m["shards"][1]["crc32"] = (m["shards"][1]["crc32"].as_u64().unwrap() | 1 << 32).into()), corrupt));
    // Shard files with correct size and checksum in the manifest but wrong contents.
    fn shard_edit(f: impl Fn(&mut Tensors) + 'static) -> Damage {
        Box::new(move |d: &Path, files: &[String]| {
            rebuild_shard(&d.join(&files[1]), &f);
            reseal(d);
        })
    }
    v.push(("shard: centers missing".into(), shard_edit(|t| t.retain(|x| x.0 != "centers")), corrupt));
    v.push(("shard: steps missing".into(), shard_edit(|t| t.retain(|x| x.0 != "steps")), corrupt));
    v.push(("shard: exp_avg_sq missing".into(), shard_edit(|t| t.retain(|x| x.0 != "exp_avg_sq")), corrupt));
    v.push(("shard: centers flattened".into(), shard_edit(|t| {
        let c = t.iter_mut().find(|x| x.0 == "centers").unwrap();
        c.2 = vec![c.2[0] * c.2[1]];
    }), corrupt));
    v.push(("shard: centers one row short".into(), shard_edit(|t| {
        let c = t.iter_mut().find(|x| x.0 == "centers").unwrap();
        c.2[0] -= 1;
        let keep = c.3.len() - D * value_bytes(c.1);
        c.3.truncate(keep);
    }), corrupt));
    v.push(("shard: centers as f16".into(), shard_edit(|t| {
        let c = t.iter_mut().find(|x| x.0 == "centers").unwrap();
        c.1 = Dtype::F16;
        let half = c.2.iter().product::<usize>() * 2;
        c.3.truncate(half);
    }), corrupt));
    // The storage dtype: the manifest's and every state tensor's must agree.
    v.push(("shard: centers in the other storage dtype".into(), shard_edit(|t| convert(t.iter_mut().find(|x| x.0 == "centers").unwrap())), corrupt));
    v.push(("shard: every state tensor in the other storage dtype".into(), shard_edit(|t| t.iter_mut().filter(|x| x.0 != "steps").for_each(convert)), corrupt));
    v.push(("manifest: the other storage dtype".into(), edit(|m| m["storage_dtype"] = if m["storage_dtype"] == "bf16" { "f32" } else { "bf16" }.into()), corrupt));
    v.push(("manifest: storage dtype a number".into(), edit(|m| m["storage_dtype"] = 2.into()), corrupt));
    if storage == PFC_DTYPE_BF16 {
        // A manifest without it is an f32 checkpoint, as before bf16 storage: these files are not.
        v.push(("manifest: no storage dtype".into(), edit(|m| { m.as_object_mut().unwrap().remove("storage_dtype"); }), corrupt));
        // Format 2 holds f32 state only: versions before bf16 storage must not read these files.
        v.push(("manifest: bf16 state under format version 2".into(), edit(|m| m["format_version"] = 2.into()), corrupt));
    }
    for (what, count) in [("2^31", 1u32 << 31), ("2^32 - 1", u32::MAX), ("one more than the head's steps", 4)] {
        let steps: Damage = Box::new(move |d: &Path, files: &[String]| {
            rebuild_shard(&d.join(&files[1]), |t| t.iter_mut().find(|x| x.0 == "steps").unwrap().3[4..8].copy_from_slice(&count.to_le_bytes()));
            reseal(d);
        });
        v.push((format!("shard: a row's AdamW step count {what}"), steps, corrupt));
    }
    v.push(("shard: steps as i32".into(), shard_edit(|t| t.iter_mut().find(|x| x.0 == "steps").unwrap().1 = Dtype::I32), corrupt));
    v.push(("shard: a NaN center".into(), shard_edit(|t| set_value(t, "centers", 2, f32::NAN)), corrupt));
    v.push(("shard: a center of norm 2^70 (pfc_set_centers refuses it)".into(), shard_edit(|t| set_value(t, "centers", 2, 2f32.powi(70))), corrupt));
    v.push(("shard: an infinite moment".into(), shard_edit(|t| set_value(t, "exp_avg", 0, f32::INFINITY)), corrupt));
    v.push(("shard: a negative infinite second moment".into(), shard_edit(|t| set_value(t, "exp_avg_sq", 5, f32::NEG_INFINITY)), corrupt));
    v.push(("shard: garbage with the right checksum".into(), Box::new(|d, f| {
        std::fs::write(d.join(&f[2]), vec![0x5a; 500]).unwrap();
        reseal(d);
    }), corrupt));
    // Incompatible, not corrupt.
    v.push(("manifest: format version 4".into(), edit(|m| m["format_version"] = 4.into()), PFC_ERR_INCOMPATIBLE));
    v.push(("manifest: format version 1 in this layout".into(), edit(|m| m["format_version"] = 1.into()), PFC_ERR_INCOMPATIBLE));
    v.push(("manifest: other class count".into(), edit(|m| {
        m["num_classes"] = (C + 1).into();
        let sh = m["shards"].as_array_mut().unwrap();
        let last = sh.len() - 1;
        sh[last]["len"] = (sh[last]["len"].as_u64().unwrap() + 1).into();
    }), PFC_ERR_INCOMPATIBLE));
    v.push(("manifest: other dimension".into(), edit(|m| m["embedding_dim"] = (D + 1).into()), PFC_ERR_INCOMPATIBLE));
    v.push(("manifest: SGD state".into(), edit(|m| m["optimizer"] = "sgd".into()), PFC_ERR_INCOMPATIBLE));
    v.push(("manifest: f16 storage".into(), edit(|m| m["storage_dtype"] = "f16".into()), PFC_ERR_INCOMPATIBLE));
    v
}

/// Every damage to a checkpoint of either storage dtype, loaded into a head of either: refused
/// with its status, the head unchanged.
#[test]
fn damaged_checkpoints_are_rejected_and_change_nothing() {
    let work = Scratch::new("damaged");
    for (saved, into) in [(PFC_DTYPE_F32, PFC_DTYPE_F32), (PFC_DTYPE_BF16, PFC_DTYPE_BF16), (PFC_DTYPE_BF16, PFC_DTYPE_F32), (PFC_DTYPE_F32, PFC_DTYPE_BF16)] {
        let (good, files) = good_checkpoint(saved);
        // The victim: trained elsewhere, with its own state.
        let victim = other_head(2, true, 0.5, into);
        let before_centers = bits(&victim.centers(D));
        let before = state_of(&victim);
        let cases = damages(saved);
        assert!(cases.len() > 60, "{}", cases.len());
        for (i, (name, damage, want)) in cases.iter().enumerate() {
            let name = format!("storage {saved} into {into}: {name}");
            let dir = work.path(&format!("case-{saved}-{into}-{i}"));
            copy_dir(&good.0, &dir);
            damage(&dir, &files);
            let got = load(&victim, &dir);
            assert_eq!(got, *want, "{name}: expected status {want}, got {got} ({})", last_error());
            assert!(!last_error().is_empty(), "{name}: no message");
            assert_eq!(bits(&victim.centers(D)), before_centers, "{name}: centers changed");
            if i % 8 == 0 {
                assert_eq!(state_of(&victim), before, "{name}: state changed");
            }
            // Loading writes nothing: the damaged directory is as the damage left it.
            std::fs::remove_dir_all(&dir).unwrap();
        }
        assert_eq!(state_of(&victim), before);
        // The undamaged checkpoint still loads into it.
        ok(load(&victim, &good.0));
        assert_ne!(bits(&victim.centers(D)), before_centers);
    }
}

/// An f32 checkpoint holding values that bf16 rounds beyond what a head accepts — an f32 value
/// above bf16's largest (it rounds to infinity), a center whose norm only the rounding takes above
/// 2^62 — is refused by a bf16 head as incompatible, unchanged, and loads into an f32 head.
#[test]
fn f32_values_that_bf16_cannot_hold_are_refused_by_a_bf16_head() {
    // Found by tests/all/storage_files.rs's search: 2^61 and this value have a norm of at most
    // 2^62 in f32, above it once each is rounded to the nearest bf16.
    let (a, b) = (2f32.powi(61), 3.993_837_2e18f32);
    let norm = |a: f32, b: f32| (a as f64 * a as f64 + b as f64 * b as f64).sqrt();
    assert!(norm(a, b) <= 2f64.powi(62) && norm(half::bf16::from_f32(a).to_f32(), half::bf16::from_f32(b).to_f32()) > 2f64.powi(62));
    type Edit = Box<dyn Fn(&mut Tensors)>;
    let cases: [(&str, Edit); 2] = [
        ("a moment beyond bf16's range", Box::new(|t| set_value(t, "exp_avg", 3, f32::MAX))),
        ("a center over the norm bound once rounded", Box::new(move |t| {
            for i in 0..D {
                set_value(t, "centers", i, 0.0);
            }
            set_value(t, "centers", 0, a);
            set_value(t, "centers", 1, b);
        })),
    ];
    for (what, edit) in cases {
        let (good, files) = good_checkpoint(PFC_DTYPE_F32);
        rebuild_shard(&good.0.join(&files[1]), |t| edit(t));
        reseal(&good.0);
        let victim = other_head(2, true, 0.5, PFC_DTYPE_BF16);
        let before = state_of(&victim);
        assert_eq!(load(&victim, &good.0), PFC_ERR_INCOMPATIBLE, "{what}: {}", last_error());
        let msg = last_error();
        assert!(msg.contains("bf16") && msg.contains("f32"), "{what}: {msg}");
        assert_eq!(state_of(&victim), before, "{what}: the head changed");
        let f32_head = other_head(2, true, 0.5, PFC_DTYPE_F32);
        ok(load(&f32_head, &good.0));
        assert_eq!(state_of(&f32_head).0, Snapshot::read(&good.0).tensors, "{what}: an f32 head holds the file's values");
    }
}

#[test]
fn incompatible_heads_are_refused_and_unchanged() {
    let h = head(3, false, 1.0);
    train(&h, C, D, 3, 0, 2);
    let s = Scratch::new("incompatible");
    ok(save(&h, &s.0));
    let shapes = [(C + 1, D as u32, false), (C - 1, D as u32, false), (C, D as u32 + 1, false), (C, D as u32 - 4, false), (C, D as u32, true)];
    for (c, d, adamw) in shapes {
        let other = TestHead::new(&config(c, d, 2, adamw, 1.0));
        train(&other, c, d as usize, 2, 50, 1);
        let before = bits(&other.centers(d as usize));
        assert_eq!(load(&other, &s.0), PFC_ERR_INCOMPATIBLE, "C {c}, d {d}, adamw {adamw}");
        let msg = last_error();
        assert!(msg.contains("classes") || msg.contains("optimizer"), "{msg}");
        assert_eq!(bits(&other.centers(d as usize)), before);
    }
    // The other way round: an AdamW checkpoint into an SGD head.
    let adam = head(1, true, 1.0);
    let s2 = Scratch::new("incompatible-adam");
    ok(save(&adam, &s2.0));
    let sgd = head(2, false, 1.0);
    assert_eq!(load(&sgd, &s2.0), PFC_ERR_INCOMPATIBLE);
}

#[test]
fn bad_paths_and_arguments() {
    let h = head(2, false, 1.0);
    let s = Scratch::new("paths");
    let before = bits(&h.centers(D));
    // No directory: an I/O error, not corruption.
    assert_eq!(load(&h, &s.path("does-not-exist")), PFC_ERR_IO);
    assert!(last_error().contains("does-not-exist"), "{}", last_error());
    std::fs::write(s.path("a-file"), b"x").unwrap();
    assert_eq!(load(&h, &s.path("a-file")), PFC_ERR_IO);
    // An empty directory is not a checkpoint.
    std::fs::create_dir(s.path("empty")).unwrap();
    assert_eq!(load(&h, &s.path("empty")), PFC_ERR_CORRUPT);
    assert_eq!(bits(&h.centers(D)), before);
    // Saving where a directory cannot be made.
    assert_eq!(save(&h, &s.path("a-file/ckpt")), PFC_ERR_IO);
    assert_eq!(save(&h, &s.path("a-file")), PFC_ERR_IO);
    // NULL and empty arguments.
    let dir = cpath(&s.path("ckpt"));
    assert_eq!(pfc_save_checkpoint(std::ptr::null(), dir.as_ptr()), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_save_checkpoint(h.0, std::ptr::null()), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_load_checkpoint(std::ptr::null_mut(), dir.as_ptr()), PFC_ERR_NULL_ARGUMENT);
    assert_eq!(pfc_load_checkpoint(h.0, std::ptr::null()), PFC_ERR_NULL_ARGUMENT);
    let empty = std::ffi::CString::new("").unwrap();
    assert_eq!(pfc_save_checkpoint(h.0, empty.as_ptr()), PFC_ERR_INVALID_ARGUMENT);
    assert_eq!(pfc_load_checkpoint(h.0, empty.as_ptr()), PFC_ERR_INVALID_ARGUMENT);
    // Nested directories are created.
    ok(save(&h, &s.path("x/y/z")));
    ok(load(&h, &s.path("x/y/z")));
    assert_eq!(bits(&h.centers(D)), before);
}

/// A manifest without `storage_dtype` — every checkpoint written before bf16 storage — is f32 and
/// loads, into a head of either storage.
#[test]
fn checkpoints_from_before_bf16_storage_load_as_f32() {
    let (good, _) = good_checkpoint(PFC_DTYPE_F32);
    let mut m = read_manifest(&good.0);
    m.as_object_mut().unwrap().remove("storage_dtype").expect("the manifest names its storage");
    write_manifest(&good.0, &m);
    let centers = Snapshot::read(&good.0).f32("centers");
    for storage in [PFC_DTYPE_F32, PFC_DTYPE_BF16] {
        let h = other_head(2, true, 0.5, storage);
        ok(load(&h, &good.0));
        let want: Vec<f32> = if storage == PFC_DTYPE_BF16 { centers.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect() } else { centers.clone() };
        assert_eq!(bits(&h.centers(D)), bits(&want), "storage {storage}");
    }
}
