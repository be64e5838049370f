//! Long fuzz runs of `switchyard::pg::fuzz` targets on seeded random inputs (the
//! toolchain here is stable-only, so no libFuzzer): `make fuzz`, or
//!
//!   cargo run --release --features fuzzing --example fuzz -- [TARGET|all] [ITERATIONS] [SEED]
//!
//! Prints inputs per target and time taken; a failing input is printed as hex, to run
//! again with `fuzz replay TARGET HEX`.

use std::time::Instant;

use rand::{RngExt, SeedableRng};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `fuzz replay TARGET HEX`: run one input again (with FUZZ_TRACE=1 for the machine's
    // events).
    if args.first().map(String::as_str) == Some("replay") {
        let hex = args.get(2).expect("usage: fuzz replay TARGET HEX");
        let data: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        switchyard::pg::fuzz::run(&args[1], &data);
        println!("no failure");
        return;
    }
    let which = args.first().map(String::as_str).unwrap_or("all");
    let iterations: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let targets: Vec<&str> = if which == "all" {
        switchyard::pg::fuzz::TARGETS.to_vec()
    } else {
        vec![which]
    };
    for target in targets {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let started = Instant::now();
        let mut data = Vec::with_capacity(1024);
        for i in 0..iterations {
            data.clear();
            let len = match rng.random_range(0..10) {
                0..=5 => rng.random_range(0..64),
                6..=8 => rng.random_range(64..512),
                _ => rng.random_range(512..4096),
            };
            data.extend((0..len).map(|_| rng.random::<u8>()));
            let input = data.clone();
            let result = std::panic::catch_unwind(|| switchyard::pg::fuzz::run(target, &input));
            if result.is_err() {
                let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
                eprintln!("fuzz {target}: input {i} (seed {seed}) failed: {hex}");
                std::process::exit(1);
            }
        }
        println!(
            "fuzz {target}: {iterations} inputs, seed {seed}, {:.1} s, no failure",
            started.elapsed().as_secs_f64()
        );
    }
}
