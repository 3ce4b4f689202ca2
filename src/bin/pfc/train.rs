//! `pfc train`: synthetic identities, a linear backbone trained with the gradients the head returns,
//! PartialFC sampling, then held-out evaluation over all classes.

use clap::Parser;
use partialfc::backend::{Embeddings, GradOut, HostBatch};
use partialfc::config::{Config, DType, MarginGrad};
use partialfc::rng;
use partialfc::Head;
use std::time::Instant;

#[derive(Parser, Debug, Clone)]
pub struct TrainArgs {
    /// Identities (classes of the head).
    #[arg(long, default_value_t = 20_000)]
    pub classes: u64,
    /// Embedding dimension produced by the backbone.
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Dimension of the synthetic "images" the backbone reads.
    #[arg(long, default_value_t = 64)]
    pub input_dim: usize,
    /// Images per step over all shards.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    #[arg(long, default_value_t = 400)]
    pub steps: u64,
    /// Fraction of each shard's classes sampled per step (PartialFC); 1 = full softmax.
    #[arg(long, default_value_t = 0.1)]
    pub sample_rate: f32,
    /// Local shards (threads of work standing in for GPUs).
    #[arg(long, default_value_t = 2)]
    pub shards: u32,
    /// Margin: arcface (m2 = 0.5) or cosface (m3 = 0.4).
    #[arg(long, default_value = "arcface")]
    pub margin: String,
    /// Head learning rate (SGD, momentum 0.9).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f32,
    /// Within-identity noise of the synthetic images relative to the identity signal.
    #[arg(long, default_value_t = 0.7)]
    pub noise: f32,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Identity `c`'s image: its prototype plus per-image noise, both drawn from counters.
fn image(seed: u64, class: u64, instance: u64, noise: f32, out: &mut [f32]) {
    rng::init_center(seed, class, 1.0, out);
    let mut n = vec![0f32; out.len()];
    rng::init_center(seed ^ 0xA5A5_5A5A, class.wrapping_mul(1 << 20) ^ instance, noise, &mut n);
    out.iter_mut().zip(&n).for_each(|(o, v)| *o += v);
}

struct Backbone {
    weights: Vec<f32>,
    input_dim: usize,
    dim: usize,
}

impl Backbone {
    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut e = vec![0f32; rows * self.dim];
        for r in 0..rows {
            let xr = &x[r * self.input_dim..(r + 1) * self.input_dim];
            let er = &mut e[r * self.dim..(r + 1) * self.dim];
            for (i, &xi) in xr.iter().enumerate() {
                let w = &self.weights[i * self.dim..(i + 1) * self.dim];
                er.iter_mut().zip(w).for_each(|(o, &wv)| *o += xi * wv);
            }
        }
        e
    }

    fn sgd(&mut self, x: &[f32], grad: &[f32], rows: usize, lr: f32) {
        for r in 0..rows {
            let xr = &x[r * self.input_dim..(r + 1) * self.input_dim];
            let gr = &grad[r * self.dim..(r + 1) * self.dim];
            for (i, &xi) in xr.iter().enumerate() {
                let w = &mut self.weights[i * self.dim..(i + 1) * self.dim];
                w.iter_mut().zip(gr).for_each(|(wv, &g)| *wv -= lr * xi * g);
            }
        }
    }
}

pub fn run(a: TrainArgs) -> Result<(), String> {
    let mut cfg = Config { num_classes: a.classes, embedding_dim: a.dim, sample_rate: a.sample_rate, seed: a.seed, ..Config::default() };
    cfg.local_shards = a.shards as usize;
    cfg.world_size = cfg.local_shards;
    cfg.optimizer.lr = a.lr;
    cfg.compute_dtype = DType::F32;
    cfg.margin.grad = MarginGrad::StraightThrough;
    match a.margin.as_str() {
        "arcface" => {}
        "cosface" => {
            cfg.margin.m2 = 0.0;
            cfg.margin.m3 = 0.4;
        }
        other => return Err(format!("--margin {other}: expected arcface or cosface")),
    }
    if a.batch < a.shards as usize {
        return Err(format!("--batch {} is smaller than --shards {}", a.batch, a.shards));
    }
    let mut head = Head::new(cfg).map_err(|e| e.message)?;
    let mut backbone = Backbone { weights: vec![0.0; a.input_dim * a.dim], input_dim: a.input_dim, dim: a.dim };
    for (i, row) in backbone.weights.chunks_mut(a.dim).enumerate() {
        rng::init_center(a.seed ^ 0xB0B, i as u64, (1.0 / a.input_dim as f32).sqrt(), row);
    }
    println!(
        "pfc train: {} identities, d = {}, batch {}, {} shards, sample rate {}, {} steps",
        a.classes, a.dim, a.batch, a.shards, a.sample_rate, a.steps
    );
    let shards = a.shards as usize;
    let rows_of = |s: usize| a.batch / shards + usize::from(s < a.batch % shards);
    let started = Instant::now();
    let mut images = 0u64;
    let mut last = None;
    for step in 0..a.steps {
        let mut xs = Vec::new();
        let mut labels = Vec::new();
        for s in 0..shards {
            let rows = rows_of(s);
            let mut x = vec![0f32; rows * a.input_dim];
            let mut l = Vec::with_capacity(rows);
            for r in 0..rows {
                let class = rng::at(rng::stream(a.seed, 99, step), (s * a.batch + r) as u64) % a.classes;
                image(a.seed, class, step * a.batch as u64 + (s * a.batch + r) as u64, a.noise, &mut x[r * a.input_dim..(r + 1) * a.input_dim]);
                l.push(class as i64);
            }
            xs.push(x);
            labels.push(l);
        }
        let embeddings: Vec<Vec<f32>> = (0..shards).map(|s| backbone.forward(&xs[s], rows_of(s))).collect();
        let mut grads: Vec<Vec<f32>> = embeddings.iter().map(|e| vec![0f32; e.len()]).collect();
        let batches: Vec<HostBatch> =
            (0..shards).map(|s| HostBatch { embeddings: Embeddings::F32(&embeddings[s]), labels: &labels[s] }).collect();
        let mut outs: Vec<GradOut> = grads.iter_mut().map(|g| GradOut::F32(g)).collect();
        let stats = head.train_step(&batches, &mut outs).map_err(|e| e.message)?;
        // The returned gradient is local_shards × the mean-loss gradient; one backbone sees it all.
        for s in 0..shards {
            backbone.sgd(&xs[s], &grads[s], rows_of(s), 0.05 / shards as f32);
        }
        images += a.batch as u64;
        last = Some(stats);
        if step % 20 == 0 || step + 1 == a.steps {
            let rate = images as f64 / started.elapsed().as_secs_f64();
            println!(
                "step {:>5}/{}  loss {:>8.4}  acc {:>6.2}%  sampled {:>7}  {:>8.0} images/s",
                step + 1,
                a.steps,
                stats.loss,
                stats.accuracy * 100.0,
                stats.sampled_classes,
                rate
            );
        }
    }
    // Held-out images of the training identities, scored against every class.
    let mut correct = 0.0;
    let mut loss = 0.0;
    let eval_rounds = 4u64;
    for round in 0..eval_rounds {
        let rows = a.batch;
        let mut x = vec![0f32; rows * a.input_dim];
        let mut l = Vec::with_capacity(rows);
        for r in 0..rows {
            let class = rng::at(rng::stream(a.seed, 100, round), r as u64) % a.classes;
            image(a.seed, class, u64::MAX - (round * rows as u64 + r as u64), a.noise, &mut x[r * a.input_dim..(r + 1) * a.input_dim]);
            l.push(class as i64);
        }
        let e = backbone.forward(&x, rows);
        let mut batches = vec![HostBatch { embeddings: Embeddings::F32(&e), labels: &l }];
        for _ in 1..shards {
            batches.push(HostBatch { embeddings: Embeddings::F32(&[]), labels: &[] });
        }
        let s = head.evaluate(&batches).map_err(|e| e.message)?;
        correct += s.accuracy;
        loss += s.loss;
    }
    let final_stats = last.map(|s| s.loss).unwrap_or(f64::NAN);
    println!(
        "done in {:.1}s: last training loss {:.4}; held-out images, all {} classes: loss {:.4}, top-1 {:.2}%",
        started.elapsed().as_secs_f64(),
        final_stats,
        a.classes,
        loss / eval_rounds as f64,
        correct / eval_rounds as f64 * 100.0
    );
    Ok(())
}
