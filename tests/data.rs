//! Datasets: deterministic, right-sized, doing what their task says; files read back exactly;
//! labels shifted over the global sequence before sharding.

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};
use ulysses::attention::SeqLayout;
use ulysses::data::{shard, Dataset, DatasetConfig, Synthetic, Task, TokenDtype, Tokenizer};
use ulysses::model::IGNORE;

fn row(t: &Tensor, i: i64) -> Vec<u8> {
    Vec::<i64>::try_from(t.get(i)).unwrap_or_default().into_iter().map(|v| v as u8).collect()
}

#[test]
fn synthetic_tasks_are_deterministic_and_well_formed() -> Result<()> {
    for task in [Task::AssociativeRecall, Task::Passkey, Task::Dyck] {
        let d = Synthetic::new(task);
        for n in [7i64, 64, 301] {
            let a = d.batch(5, 3, 0, 2, n)?;
            ensure!(a.size() == vec![2, n] && a.kind() == Kind::Int64, "{task:?} n={n}: {:?}", a.size());
            ensure!(a.equal(&d.batch(5, 3, 0, 2, n)?), "{task:?}: not deterministic");
            ensure!(!a.equal(&d.batch(5, 4, 0, 2, n)?), "{task:?}: the same data at another step");
            ensure!(!a.equal(&d.batch(5, 3, 1, 2, n)?), "{task:?}: the same data on another replica");
            ensure!(a.max().int64_value(&[]) < 256 && a.min().int64_value(&[]) >= 0, "{task:?}: not bytes");
        }
    }
    // Passkey: the key asked at the end is the one hidden inside.
    let p = String::from_utf8(row(&Synthetic::new(Task::Passkey).batch(1, 0, 0, 1, 400)?, 0))?;
    let key = &p[p.len() - 6..p.len() - 1];
    ensure!(p.matches(&format!("The pass key is {key}.")).count() == 2, "{p}");
    // Associative recall: the query's value is the first pair's value.
    let r = String::from_utf8(row(&Synthetic::new(Task::AssociativeRecall).batch(1, 0, 0, 1, 200)?, 0))?;
    let query = &r[r.len() - 5..];
    let first = r.trim_start().split(' ').next().unwrap_or("");
    ensure!(query == format!("?{first}"), "query {query:?}, first pair {first:?}");
    // Dyck: balanced, every closing bracket matches.
    let d = row(&Synthetic::new(Task::Dyck).batch(1, 0, 0, 1, 500)?, 0);
    let mut stack = Vec::new();
    for c in d {
        match c {
            b'(' | b'[' | b'{' | b'<' => stack.push(c),
            b')' | b']' | b'}' | b'>' => {
                let open = stack.pop().unwrap_or(0);
                ensure!(
                    matches!((open, c), (b'(', b')') | (b'[', b']') | (b'{', b'}') | (b'<', b'>')),
                    "mismatch"
                );
            }
            _ => {}
        }
    }
    ensure!(stack.is_empty(), "unbalanced");
    Ok(())
}

#[test]
fn text_and_token_files() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("ulysses-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("t.txt"), "abcabcabd")?;
    let chars = DatasetConfig::Text { path: "t.txt".into(), tokenizer: Tokenizer::Char }.open(&dir)?;
    ensure!(chars.vocab_size() == 4, "char vocabulary {}", chars.vocab_size());
    let bytes = DatasetConfig::Text { path: "t.txt".into(), tokenizer: Tokenizer::Byte }.open(&dir)?;
    let b = bytes.batch(1, 0, 0, 3, 9)?;
    ensure!(row(&b, 0) == b"abcabcabd", "a window of the whole file is the file");

    let ids: Vec<u16> = (0..1000).map(|i| (i * 37 % 50000) as u16).collect();
    let raw: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join("train.bin"), &raw)?;
    let tokens =
        DatasetConfig::Tokens { path: "train.bin".into(), dtype: TokenDtype::U16, vocab_size: 50304 }
            .open(&dir)?;
    let t = tokens.batch(2, 7, 0, 4, 100)?;
    let first = Vec::<i64>::try_from(t.get(0))?;
    let start = ids.iter().position(|&v| i64::from(v) == first[0]).unwrap_or(usize::MAX);
    ensure!(
        first.iter().zip(&ids[start..]).all(|(a, b)| *a == i64::from(*b)),
        "a window is not a run of the file"
    );

    let too_small =
        DatasetConfig::Tokens { path: "train.bin".into(), dtype: TokenDtype::U16, vocab_size: 100 }
            .open(&dir);
    ensure!(
        too_small.err().map(|e| e.to_string()).unwrap_or_default().contains("not below vocab_size 100"),
        "vocab check"
    );
    std::fs::write(dir.join("odd.bin"), [1u8, 2, 3])?;
    let odd =
        DatasetConfig::Tokens { path: "odd.bin".into(), dtype: TokenDtype::U16, vocab_size: 100 }.open(&dir);
    ensure!(odd.err().map(|e| e.to_string()).unwrap_or_default().contains("not a whole number"), "odd file");
    let short = bytes.batch(1, 0, 0, 1, 50);
    ensure!(
        short.err().map(|e| e.to_string()).unwrap_or_default().contains("fewer than one sequence of 50"),
        "short file"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn labels_are_shifted_before_sharding() -> Result<()> {
    // Tokens 0..10 over 3 ranks (4, 3, 3) contiguous and over 2 ranks zigzag.
    let global = Tensor::arange(10, (Kind::Int64, Device::Cpu)).reshape([1, 10]);
    let layout = SeqLayout::contiguous(10, 3)?;
    let s0 = shard(&global, &layout, 0)?;
    ensure!(
        Vec::<i64>::try_from(s0.labels.get(0))? == vec![1, 2, 3, 4],
        "rank 0 keeps the label of its last token"
    );
    let s2 = shard(&global, &layout, 2)?;
    ensure!(Vec::<i64>::try_from(s2.labels.get(0))? == vec![8, 9, IGNORE], "the last token has no label");
    let zz = SeqLayout::zigzag(8, 2)?;
    let z1 = shard(&global.narrow(1, 0, 8), &zz, 1)?;
    ensure!(Vec::<i64>::try_from(z1.tokens.get(0))? == vec![2, 3, 4, 5], "zigzag rank 1 tokens");
    ensure!(Vec::<i64>::try_from(z1.labels.get(0))? == vec![3, 4, 5, 6], "zigzag rank 1 labels");
    Ok(())
}
