//! Parity with the reference implementation's vectors in ../shared/golden, through the C ABI, with
//! the file's world size and with other shard counts (at r = 1 sharding must not change the result).

use crate::common::*;

const TOL: f64 = 1e-4;

fn run(g: &Golden, shards: usize) {
    check(g, &TestHead::new(&g.pfc_config(shards as u32)), shards);
}

/// The file's steps on `head`, a head of `shards` shards made from the file's configuration.
fn check(g: &Golden, head: &TestHead, shards: usize) {
    let (c, d) = (g.usize("num_classes"), g.usize("embedding_dim"));
    let world = g.usize("world_size");
    let steps = g.usize("steps");
    let init = g.f32("weight_init");
    head.set_centers(&init);
    for t in 0..steps {
        let emb = g.f32(&format!("emb.{t}"));
        let labels = g.i64(&format!("labels.{t}"));
        let n = labels.len();
        let (stats, grad) = head.step(&emb, &labels, d, &even_split(n, shards));
        let want_loss = g.f32(&format!("loss.{t}"))[0] as f64;
        let loss_err = (stats.loss - want_loss).abs() / want_loss.abs();
        assert!(loss_err <= TOL, "{} shards={shards} step {t}: loss {} vs {want_loss}", g.name, stats.loss);
        assert_eq!(stats.global_batch, n as u64);
        assert_eq!(stats.sampled_classes, c as u64);
        // The reference returns world_size × the local gradient of the mean loss; we return
        // local_shards × it.
        let want: Vec<f32> = g.f32(&format!("grad_emb.{t}")).iter().map(|v| v / world as f32 * shards as f32).collect();
        let e = rel_err(&grad, &want);
        assert!(e <= TOL, "{} shards={shards} step {t}: grad rel err {e}", g.name);
        let w = head.centers(d);
        let want_w = g.f32(&format!("weight.{t}"));
        let e = rel_err(&w, &want_w);
        assert!(e <= TOL, "{} shards={shards} step {t}: weight rel err {e}", g.name);
        // The update itself, not only the weights it is added to.
        let prev = if t == 0 { init.clone() } else { g.f32(&format!("weight.{}", t - 1)) };
        let delta: Vec<f32> = w.iter().zip(&prev).map(|(a, b)| a - b).collect();
        let want_delta: Vec<f32> = want_w.iter().zip(&prev).map(|(a, b)| a - b).collect();
        let e = rel_err(&delta, &want_delta);
        assert!(e <= 1e-3, "{} shards={shards} step {t}: update rel err {e}", g.name);
        if g.head().is_some() {
            let (got, want) = (head.margin_state(), g.f32(&format!("state.{t}")));
            let e = rel_err(&got, &want);
            assert!(e <= TOL, "{} shards={shards} step {t}: running statistics {got:?} vs {want:?}", g.name);
        }
        let _ = c;
    }
}

/// AdaFace (issue #25) against its authors' head, at 1, 2 and 3 shards: loss, embedding gradient,
/// centers and the running norm statistics after each step.
#[test]
fn adaface_golden_at_one_two_and_three_shards() {
    for g in Golden::of_head("adaface") {
        for shards in [1, 2, 3] {
            run(&g, shards);
        }
    }
}

/// CurricularFace (issue #25) against its authors' head, at 1, 2 and 3 shards: loss, embedding
/// gradient, centers and t after each step. Its hard negatives depend on each row's target cosine,
/// which sharded, only one shard holds: the step's pre-pass exchange must carry it to the others.
#[test]
fn curricular_golden_at_one_two_and_three_shards() {
    for g in Golden::of_head("curricular") {
        for shards in [1, 2, 3] {
            run(&g, shards);
        }
    }
}

/// Both adaptive margins on the CUDA backend, over 1, 2 and 3 GPUs (on the emulation where no GPU
/// is; a GPU machine with fewer runs the counts it has): loss, embedding gradient, centers and
/// running statistics after each step.
#[test]
fn cuda_adaptive_golden_at_one_two_and_three_gpus() {
    if !on_cuda(module_path!(), "cuda_adaptive_golden_at_one_two_and_three_gpus") {
        return;
    }
    for g in Golden::of_head("adaface").into_iter().chain(Golden::of_head("curricular")) {
        for gpus in [1, 2, 3] {
            if crate::gpu_jobs::has_gpus(gpus, &format!("{} over {gpus} GPUs", g.name)) {
                let devices: Vec<i32> = (0..gpus as i32).collect();
                check(&g, &crate::gpu_jobs::cuda_head(&g.pfc_config(gpus as u32), &devices), gpus);
            }
        }
    }
}

#[test]
fn golden_with_the_files_world_size() {
    for g in Golden::all() {
        run(&g, g.usize("world_size"));
    }
}

#[test]
fn golden_with_other_shard_counts() {
    for g in Golden::all() {
        for shards in [1, 2, 3, 5, 8] {
            if shards != g.usize("world_size") {
                run(&g, shards);
            }
        }
    }
}
