//! The statistics `bt86 bench` reports: the minimum and the median of a workload's samples.

/// The smallest sample (None for no samples).
pub fn min(samples: &[f64]) -> Option<f64> {
    samples.iter().copied().reduce(f64::min)
}

/// The median: the middle sample, or the mean of the two middle ones (None for no samples).
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// `value / baseline`, when both exist and the baseline is not zero.
pub fn ratio(value: Option<f64>, baseline: Option<f64>) -> Option<f64> {
    match (value, baseline) {
        (Some(v), Some(b)) if b > 0.0 => Some(v / b),
        _ => None,
    }
}

/// `part` as a percentage of `whole` (CPU time over wall time: 100 is one core busy), when
/// `whole` is positive.
pub fn percent(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0).then(|| part / whole * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn min_and_ratio() {
        assert_eq!(min(&[3.0, 1.5, 2.0]), Some(1.5));
        assert_eq!(min(&[]), None);
        assert_eq!(ratio(Some(6.0), Some(2.0)), Some(3.0));
        assert_eq!(ratio(Some(6.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
    }

    #[test]
    fn percent_of_a_whole() {
        // 750 ms of CPU over 30 s of wall time is 2.5% of one core.
        assert_eq!(percent(750.0, 30_000.0), Some(2.5));
        // Two busy threads over the same time: 200%.
        assert_eq!(percent(2.0, 1.0), Some(200.0));
        assert_eq!(percent(0.0, 5.0), Some(0.0));
        assert_eq!(percent(1.0, 0.0), None);
        assert_eq!(percent(1.0, -1.0), None);
    }
}
