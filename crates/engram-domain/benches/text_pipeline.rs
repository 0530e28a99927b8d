//! What every stored memory goes through before it reaches the database: sanitize (with the
//! HTML5 sanitizer), normalize, SHA-256 content hash and 64-bit SimHash, on contents like an
//! agent stores: short facts, a sentence with markup, a long conversation summary.
//!
//!     cargo bench -p engram-domain --bench text_pipeline

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use engram_domain::{sanitize, text, validate};
use std::hint::black_box;

fn contents() -> [(&'static str, String); 4] {
    [
        (
            "short fact",
            "Customer prefers email over phone calls".to_owned(),
        ),
        (
            "fact with markup",
            "Moved to <b>Lisbon</b> in 2021; billing address updated (ref 48213-7) \
             <script>alert('x')</script> see <a href=\"javascript:evil()\">profile</a>"
                .to_owned(),
        ),
        (
            "unicode preference",
            "Prefiere que le llamen después de las 18:00 · 電話より メール · ÉCRIRE EN FRANÇAIS"
                .to_owned(),
        ),
        (
            "conversation summary (2 KB)",
            "The customer called about order #482913, delayed by four days. They were \
             frustrated but polite, asked for a refund of the shipping fee and mentioned \
             they are travelling next week, so delivery must happen before Friday. "
                .repeat(8),
        ),
    ]
}

fn pipeline(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_pipeline");
    for (name, content) in contents() {
        group.throughput(Throughput::Bytes(content.len() as u64));
        group.bench_function(format!("sanitize/{name}"), |b| {
            b.iter(|| sanitize::sanitize_text(black_box(&content)))
        });
        let clean = validate::content("content", &content).expect("valid content");
        group.bench_function(format!("normalize/{name}"), |b| {
            b.iter(|| text::normalize_content(black_box(&clean)))
        });
        group.bench_function(format!("content_hash/{name}"), |b| {
            b.iter(|| text::content_hash(black_box(&clean)))
        });
        group.bench_function(format!("simhash/{name}"), |b| {
            b.iter(|| text::semantic_hash(black_box(&clean)))
        });
        group.bench_function(format!("all/{name}"), |b| {
            b.iter(|| {
                let clean = validate::content("content", black_box(&content)).expect("valid");
                text::content_hashes(&clean)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
