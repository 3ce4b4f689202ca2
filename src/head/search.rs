//! Top-k by cosine over a head's or an index's classes: `top_k` is the one search path of training
//! heads and search-only indexes (checks, query normalization, results), and `search_job` merges
//! every process's hits.

use crate::backend::cpu::unit_rows;
use crate::comm::group::ProcessGroup;
use crate::error::{try_zeroed, Error, Result, Status};
use crate::topk::TopK;

/// The `k` best classes by cosine for each query (rows of `queries`, dimension `d`) among `classes`
/// classes, which `scan` scores given unit-norm queries: `(ids, scores)`, `n × k` each, best first,
/// ties by smaller class id.
pub(crate) fn top_k(
    queries: &[f32],
    d: usize,
    classes: u64,
    k: usize,
    scan: impl FnOnce(&[f32], usize) -> Result<Vec<Vec<(f32, u64)>>>,
) -> Result<(Vec<i64>, Vec<f32>)> {
    check_queries(queries, d, classes, k)?;
    let mut unit = try_zeroed::<f32>(queries.len(), "normalized queries")?;
    unit_rows(queries, d, &mut unit);
    let hits = scan(&unit, k)?;
    // The C ABI copies exactly n × k results: never hand back short rows.
    if hits.len() != queries.len() / d || hits.iter().any(|row| row.len() != k) {
        return Err(Error::new(Status::Panic, "internal error: search returned fewer than k hits for a query"));
    }
    let mut ids = try_zeroed::<i64>(hits.len() * k, "search results")?;
    let mut scores = try_zeroed::<f32>(hits.len() * k, "search results")?;
    for ((row, ids), scores) in hits.into_iter().zip(ids.chunks_exact_mut(k)).zip(scores.chunks_exact_mut(k)) {
        for ((score, class), (id, s)) in row.into_iter().zip(ids.iter_mut().zip(scores.iter_mut())) {
            *id = class as i64;
            *s = score;
        }
    }
    Ok((ids, scores))
}

/// A search by every process of a job over its own classes, `local` scoring this process's (with
/// `k` capped at their count): every process passes the same queries and receives the same merged
/// result — `top_k` over all classes, whatever the layout, as the order of hits is total and each
/// score a function of the query and the center alone.
pub(crate) fn search_job(
    group: &ProcessGroup,
    queries: &[f32],
    d: usize,
    classes: u64,
    local_classes: u64,
    k: usize,
    local: impl FnOnce(&[f32], usize) -> Result<Vec<Vec<(f32, u64)>>>,
) -> Result<(Vec<i64>, Vec<f32>)> {
    if group.is_solo() {
        return top_k(queries, d, classes, k, local);
    }
    group.agree(check_queries(queries, d, classes, k))?;
    // The same queries everywhere, or the merged answer would answer nothing.
    let crc = crc32fast::hash(crate::comm::group::bytes_of(queries)) as u64;
    let all = group.allgather_u64(&[crc, queries.len() as u64])?;
    if let Some(p) = all.chunks_exact(2).position(|c| c != &all[..2]) {
        return Err(Error::invalid(format!("process {p} passed other queries than process 0: every process of a job searches the same queries")));
    }
    top_k(queries, d, classes, k, |unit, k| {
        let n = unit.len() / d;
        let mine = group.agree(local(unit, k.min(local_classes as usize)))?;
        // Each process's hits, padded to k per query (class u64::MAX marks padding).
        let mut send = try_zeroed::<u8>(n * k * 12, "search exchange")?;
        for (q, hits) in mine.iter().enumerate() {
            for i in 0..k {
                let (score, class) = hits.get(i).copied().unwrap_or((f32::NEG_INFINITY, u64::MAX));
                let at = (q * k + i) * 12;
                send[at..at + 4].copy_from_slice(&score.to_le_bytes());
                send[at + 4..at + 12].copy_from_slice(&class.to_le_bytes());
            }
        }
        let all = group.allgather(&send)?;
        let mut best = TopK::new(n, k);
        for part in all.chunks_exact(send.len()) {
            for (j, hit) in part.chunks_exact(12).enumerate() {
                let class = u64::from_le_bytes(hit[4..12].try_into().expect("8 bytes"));
                if class != u64::MAX {
                    best.push(j / k, f32::from_le_bytes(hit[..4].try_into().expect("4 bytes")), class);
                }
            }
        }
        Ok(best.into_sorted())
    })
}

/// The checks of a search's arguments that do not depend on where the classes live.
pub(crate) fn check_queries(queries: &[f32], d: usize, classes: u64, k: usize) -> Result<()> {
    if queries.is_empty() || !queries.len().is_multiple_of(d) {
        return Err(Error::invalid(format!("{} query values do not form rows of dimension {d}", queries.len())));
    }
    check_k(k as u64, classes)?;
    if let Some(at) = queries.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!("query row {} holds NaN or Inf", at / d)));
    }
    Ok(())
}

/// `k` must be in [1, classes searched].
pub(crate) fn check_k(k: u64, classes: u64) -> Result<()> {
    if k == 0 || k > classes {
        return Err(Error::invalid(format!("k = {k} is outside [1, {classes}] (the classes searched)")));
    }
    Ok(())
}
