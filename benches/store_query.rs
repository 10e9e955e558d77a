//! How fast narpost reads path info from the store: `Store::query` and `Store::closure` for
//! up to 10,000 valid paths, the numbers the pipeline's planning step depends on.
//! Run through `benches/run` (which makes sure the store holds 10,000 paths) or
//! `cargo bench --bench store_query`.

use std::time::Instant;

use narpost::store::Store;

fn main() {
    let store = match Store::open_default() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("store_query: {e}");
            std::process::exit(1);
        }
    };
    let all = match store.registered_since(0) {
        Ok(all) => all,
        Err(e) => {
            eprintln!("store_query: {e}");
            std::process::exit(1);
        }
    };
    let paths: Vec<_> = all.into_iter().map(|(p, _)| p).take(10_000).collect();
    if paths.len() < 10_000 {
        eprintln!(
            "store_query: the store holds only {} valid paths; benches/run adds tiny ones first",
            paths.len()
        );
    }
    let mut best_query = f64::MAX;
    let mut best_closure = f64::MAX;
    let mut closure_len = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let infos = store.query(&paths).expect("query");
        best_query = best_query.min(start.elapsed().as_secs_f64());
        assert_eq!(infos.len(), paths.len());
        let start = Instant::now();
        closure_len = store.closure(&paths).expect("closure").len();
        best_closure = best_closure.min(start.elapsed().as_secs_f64());
    }
    println!("{:<44} {:>10} {:>12}", "store read", "paths", "best of 5");
    println!(
        "{:<44} {:>10} {:>10.1}ms",
        "Store::query (NarHash, size, refs, deriver)",
        paths.len(),
        best_query * 1e3
    );
    println!(
        "{:<44} {:>10} {:>10.1}ms",
        "Store::closure (topologically sorted)",
        closure_len,
        best_closure * 1e3
    );
}
