//! Evaluation metrics that need no model: kernel MMD between two sets of images.

/// Squared MMD (unbiased) between sample sets `x` and `y` of equally long vectors, with a
/// Gaussian kernel whose bandwidth is the median pairwise distance of the pooled samples.
pub fn mmd_rbf(x: &[Vec<f32>], y: &[Vec<f32>]) -> f64 {
    if x.len() < 2 || y.len() < 2 {
        return f64::NAN;
    }
    let sq = |a: &[f32], b: &[f32]| -> f64 {
        a.iter().zip(b).map(|(p, q)| ((p - q) as f64).powi(2)).sum()
    };
    let pooled: Vec<&Vec<f32>> = x.iter().chain(y).collect();
    let mut distances = Vec::new();
    for i in 0..pooled.len() {
        for j in i + 1..pooled.len() {
            distances.push(sq(pooled[i], pooled[j]));
        }
    }
    distances.sort_by(f64::total_cmp);
    let bandwidth = distances[distances.len() / 2].max(1e-12);
    let k = |a: &[f32], b: &[f32]| (-sq(a, b) / bandwidth).exp();
    let within = |s: &[Vec<f32>]| {
        let mut total = 0.0;
        for i in 0..s.len() {
            for j in 0..s.len() {
                if i != j {
                    total += k(&s[i], &s[j]);
                }
            }
        }
        total / (s.len() * (s.len() - 1)) as f64
    };
    let mut cross = 0.0;
    for a in x {
        for b in y {
            cross += k(a, b);
        }
    }
    within(x) + within(y) - 2.0 * cross / (x.len() * y.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmd_separates_different_distributions() {
        let a: Vec<Vec<f32>> = (0..20).map(|i| vec![(i % 5) as f32 * 0.1, 0.0]).collect();
        let b: Vec<Vec<f32>> = (0..20)
            .map(|i| vec![(i % 5) as f32 * 0.1 + 0.02, 0.0])
            .collect();
        let c: Vec<Vec<f32>> = (0..20)
            .map(|i| vec![(i % 5) as f32 * 0.1 + 3.0, 1.0])
            .collect();
        let near = mmd_rbf(&a, &b);
        let far = mmd_rbf(&a, &c);
        assert!(far > near && far > 0.1, "near {near} far {far}");
    }
}
