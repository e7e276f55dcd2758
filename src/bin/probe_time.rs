// TEMPORARY probe, not committed.
use tch::{Device, Kind, Reduction, Tensor};
fn time(f: &dyn Fn()) -> f64 {
    let mut ts = vec![];
    for _ in 0..9 {
        let t0 = std::time::Instant::now();
        f();
        ts.push(t0.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    ts[4] * 1e3
}
fn main() {
    tch::set_num_threads(1);
    let t: i64 = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(2048);
    let o = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([1, t, 64], o).set_requires_grad(true);
    let w = Tensor::ones([64], o).set_requires_grad(true);
    let b = Tensor::zeros([64], o).set_requires_grad(true);
    println!(
        "layernorm fwd+bwd [{t},64]: {:.3} ms",
        time(&|| {
            let y = x.layer_norm([64], Some(&w), Some(&b), 1e-5, true);
            y.sum(Kind::Float).backward();
        })
    );
    let x4 = Tensor::randn([1, t, 256], o).set_requires_grad(true);
    println!(
        "gelu fwd+bwd [{t},256]: {:.3} ms",
        time(&|| {
            let y = x4.gelu("tanh");
            y.sum(Kind::Float).backward();
        })
    );
    let q = Tensor::randn([1, t, 4, 16], o).set_requires_grad(true);
    let cos = Tensor::randn([1, t, 1, 8], o);
    let sin = Tensor::randn([1, t, 1, 8], o);
    println!(
        "rope fwd+bwd [{t},4,16]: {:.3} ms",
        time(&|| {
            let (x1, x2) = (q.narrow(3, 0, 8), q.narrow(3, 8, 8));
            let r1 = &x1 * &cos - &x2 * &sin;
            let r2 = &x2 * &cos + &x1 * &sin;
            let y = Tensor::cat(&[r1, r2], 3);
            y.sum(Kind::Float).backward();
        })
    );
    let a = Tensor::randn([1, t, 64], o).set_requires_grad(true);
    println!(
        "add fwd+bwd [{t},64]: {:.3} ms",
        time(&|| {
            let y = &a + &x;
            y.sum(Kind::Float).backward();
        })
    );
    let logits = Tensor::randn([t, 256], o).set_requires_grad(true);
    let lab = Tensor::randint(256, [t], (Kind::Int64, Device::Cpu));
    println!(
        "cross-entropy fwd+bwd [{t},256]: {:.3} ms",
        time(&|| {
            let l = logits.cross_entropy_loss::<Tensor>(&lab, None, Reduction::Sum, -100, 0.0);
            l.backward();
        })
    );
    println!(
        "sum backward alone [{t},64]: {:.3} ms",
        time(&|| {
            let y = &a * 1.0;
            y.sum(Kind::Float).backward();
        })
    );
    let lin_w = Tensor::randn([192, 64], o).set_requires_grad(true);
    let lin_b = Tensor::zeros([192], o).set_requires_grad(true);
    println!(
        "linear fwd+bwd [{t},64]->[192]: {:.3} ms",
        time(&|| {
            let y = x.linear(&lin_w, Some(&lin_b));
            y.sum(Kind::Float).backward();
        })
    );
}
