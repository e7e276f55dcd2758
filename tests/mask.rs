//! The attention rules: the dense mask, the per-position rule and the key blocks the blocked
//! kernel visits all say the same thing; parsing and bad masks.

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::attention::{AttentionConfig, BlockSparse, BlockedAttention, Kernel, Mask};

fn masks() -> Vec<Mask> {
    vec![
        Mask::None,
        Mask::Causal,
        Mask::SlidingWindow { window: 1 },
        Mask::SlidingWindow { window: 5 },
        Mask::BlockSparse(BlockSparse { block: 4, local_blocks: 2, global_blocks: 1, causal: true }),
        Mask::BlockSparse(BlockSparse { block: 3, local_blocks: 4, global_blocks: 2, causal: false }),
        Mask::BlockSparse(BlockSparse { block: 2, local_blocks: 3, global_blocks: 0, causal: false }),
    ]
}

#[test]
fn dense_rule_and_key_blocks_agree() -> Result<()> {
    for mask in masks() {
        for n in [1i64, 7, 16, 33] {
            let pos = Tensor::arange(n, (Kind::Int64, Device::Cpu));
            let dense = mask.dense(&pos, &pos)?;
            let rows = Vec::<i64>::try_from(dense.to_kind(Kind::Int64).reshape([-1]))?;
            for i in 0..n {
                ensure!(mask.allows(i, i), "{mask:?}: query {i} cannot see itself");
                for j in 0..n {
                    let d = rows[(i * n + j) as usize] == 1;
                    ensure!(d == mask.allows(i, j), "{mask:?} n={n}: dense and rule differ at ({i}, {j})");
                }
            }
            for block in [1i64, 3, 4, 8] {
                let lists = mask.key_blocks(n, block);
                for (qb, list) in lists.iter().enumerate() {
                    let qb = qb as i64;
                    for kb in 0..(n + block - 1) / block {
                        let any = (qb * block..((qb + 1) * block).min(n))
                            .any(|i| (kb * block..((kb + 1) * block).min(n)).any(|j| mask.allows(i, j)));
                        ensure!(
                            any == list.contains(&kb),
                            "{mask:?} n={n} B={block}: query block {qb}, key block {kb}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn masks_parse_from_text() -> Result<()> {
    let parsed: Vec<Mask> = ["none", "causal", "window:128", "sparse:64,4,1", "sparse-causal:16,4,1"]
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, String>>()
        .map_err(anyhow::Error::msg)?;
    ensure!(parsed[2] == Mask::SlidingWindow { window: 128 }, "{:?}", parsed[2]);
    ensure!(
        parsed[4]
            == Mask::BlockSparse(BlockSparse { block: 16, local_blocks: 4, global_blocks: 1, causal: true }),
        "{:?}",
        parsed[4]
    );
    for (bad, says) in [
        ("diagonal", "unknown mask \"diagonal\""),
        ("window:0", "sliding window 0 must be at least 1"),
        ("window:x", "\"x\" is not an integer"),
        ("sparse:16,4", "expected 3 numbers"),
        ("sparse:16,2,3", "global_blocks 3 must lie in 0..=2"),
    ] {
        let err = bad.parse::<Mask>().expect_err(bad);
        ensure!(err.contains(says), "{bad}: {err}");
    }
    Ok(())
}

#[test]
fn the_blocked_kernel_refuses_dense_masks() -> Result<()> {
    for mask in [Mask::None, Mask::Causal] {
        let err = BlockedAttention::new(mask).err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(err.contains("is dense; use the sdpa or math kernel"), "{err}");
        ensure!(AttentionConfig::new(Kernel::Blocked, mask).build().is_err(), "{mask:?}");
    }
    Ok(())
}

/// A mask written out by hand, a row per query ('1': the key is visible).
fn by_hand(rows: &[&str]) -> Vec<Vec<bool>> {
    rows.iter().map(|r| r.chars().map(|c| c == '1').collect()).collect()
}

#[test]
fn each_mask_kind_equals_a_mask_written_out_by_hand() -> Result<()> {
    // Written from the definitions (the fields' documentation; DeepSpeed's fixed sparsity
    // pattern for block-sparse), not from the code: causal sees keys up
    // to the query; a window of w the last w of those; block-sparse with blocks of 2, windows of
    // 2 blocks and 1 global block sees its own window's blocks and the last block of every
    // window (blocks 1 and 3 here), and with the causal rule only those at or before the query.
    let sparse =
        |causal| Mask::BlockSparse(BlockSparse { block: 2, local_blocks: 2, global_blocks: 1, causal });
    let cases = [
        (Mask::None, by_hand(&["111111", "111111", "111111", "111111", "111111", "111111"])),
        (Mask::Causal, by_hand(&["100000", "110000", "111000", "111100", "111110", "111111"])),
        (
            Mask::SlidingWindow { window: 2 },
            by_hand(&["100000", "110000", "011000", "001100", "000110", "000011"]),
        ),
        (
            Mask::SlidingWindow { window: 1 },
            by_hand(&["100000", "010000", "001000", "000100", "000010", "000001"]),
        ),
        (
            sparse(false),
            by_hand(&[
                "11110011", "11110011", "11110011", "11110011", "00111111", "00111111", "00111111",
                "00111111",
            ]),
        ),
        (
            sparse(true),
            by_hand(&[
                "10000000", "11000000", "11100000", "11110000", "00111000", "00111100", "00111110",
                "00111111",
            ]),
        ),
    ];
    for (mask, want) in cases {
        let n = want.len() as i64;
        let pos = Tensor::arange(n, (Kind::Int64, Device::Cpu));
        let dense = Vec::<i64>::try_from(mask.dense(&pos, &pos)?.to_kind(Kind::Int64).reshape([-1]))?;
        for (i, row) in want.iter().enumerate() {
            for (j, &visible) in row.iter().enumerate() {
                let got = dense[i * n as usize + j] == 1;
                ensure!(
                    got == visible,
                    "{mask:?}: query {i} key {j}: the mask says {got}, by hand {visible}"
                );
                ensure!(mask.allows(i as i64, j as i64) == visible, "{mask:?}: allows({i}, {j})");
            }
        }
    }
    Ok(())
}
