//! Realistic, varied requests: many sessions, unique and repeated facts of several kinds, a
//! little markup for the sanitizer, metadata like an agent back end sends.

use engram_proto::memory::v1 as pb;
use prost_types::value::Kind;

/// SplitMix64: tiny, fast and good enough to vary requests reproducibly per worker.
pub struct Random(u64);

impl Random {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    pub fn pick<'a>(&mut self, choices: &[&'a str]) -> &'a str {
        choices[self.below(choices.len() as u64) as usize]
    }

    /// A number in [low, high).
    pub fn between(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const CHANNELS: [&str; 5] = ["email", "phone", "chat", "SMS", "a callback"];
const PRODUCTS: [&str; 6] = [
    "the premium plan",
    "the family bundle",
    "router X200",
    "the annual subscription",
    "the mobile app",
    "gift cards",
];
const CITIES: [&str; 6] = ["Lisbon", "Osaka", "Denver", "Nairobi", "Berlin", "Montreal"];
const MOODS: [&str; 4] = ["frustrated", "happy", "confused", "in a hurry"];
const SOURCES: [&str; 4] = ["chat", "email", "voice", "crm-sync"];

/// Percent of stores that repeat one of a session's recurring facts (deduplicated).
const REPEATED_PERCENT: u64 = 20;
/// Recurring facts per session: the ones agents learn again on every conversation.
const RECURRING_FACTS: u64 = 4;

pub fn session_name(prefix: &str, index: u64) -> String {
    format!("sessions/{prefix}-{index}")
}

/// One of a session's recurring facts: the same text every time, so it deduplicates.
fn recurring_fact(session: u64, which: u64) -> (pb::ContentType, String) {
    let city = CITIES[(session % CITIES.len() as u64) as usize];
    let channel = CHANNELS[((session / 7) % CHANNELS.len() as u64) as usize];
    match which {
        0 => (
            pb::ContentType::UserInfo,
            format!("Customer {session} lives in {city}"),
        ),
        1 => (
            pb::ContentType::Preference,
            format!("Prefers {channel} over phone calls"),
        ),
        2 => (
            pb::ContentType::Fact,
            format!("Account {session} is on the premium plan"),
        ),
        _ => (
            pb::ContentType::Context,
            "Asked about the refund policy last week".to_owned(),
        ),
    }
}

/// A fact seen once: numbers and names make it unique, some carry markup to sanitize.
fn unique_fact(random: &mut Random, serial: u64) -> (pb::ContentType, String) {
    let order = 100_000 + random.below(900_000);
    match random.below(5) {
        0 => (
            pb::ContentType::Fact,
            format!(
                "Order #{order} of {} was delayed by {} days (ticket {serial})",
                random.pick(&PRODUCTS),
                1 + random.below(9)
            ),
        ),
        1 => (
            pb::ContentType::Context,
            format!(
                "Customer sounded {} while asking about {} on turn {serial}",
                random.pick(&MOODS),
                random.pick(&PRODUCTS)
            ),
        ),
        2 => (
            pb::ContentType::Preference,
            format!(
                "Would rather be reached by {} after {}:00, noted in case {serial}",
                random.pick(&CHANNELS),
                8 + random.below(10)
            ),
        ),
        3 => (
            pb::ContentType::UserInfo,
            format!(
                "Moved to {} in {}; <b>billing address</b> updated (ref {order}-{serial})",
                random.pick(&CITIES),
                2015 + random.below(11)
            ),
        ),
        _ => (
            pb::ContentType::Fact,
            format!(
                "Paid invoice {order} for {} by card ending {:04}, receipt {serial}",
                random.pick(&PRODUCTS),
                random.below(10_000)
            ),
        ),
    }
}

fn metadata(random: &mut Random, turn: u64) -> prost_types::Struct {
    let text = |value: &str| prost_types::Value {
        kind: Some(Kind::StringValue(value.to_owned())),
    };
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("source".to_owned(), text(random.pick(&SOURCES)));
    fields.insert(
        "agent".to_owned(),
        text(&format!("support-bot-{}", random.below(8))),
    );
    fields.insert(
        "turn".to_owned(),
        prost_types::Value {
            kind: Some(Kind::NumberValue(turn as f64)),
        },
    );
    prost_types::Struct { fields }
}

fn memory(random: &mut Random, kind: pb::ContentType, content: String, turn: u64) -> pb::Memory {
    pb::Memory {
        content,
        content_type: kind as i32,
        importance: Some((random.between(0.3, 1.0) * 100.0).round() / 100.0),
        metadata: Some(metadata(random, turn)),
        ..Default::default()
    }
}

/// StoreMemory requests over `sessions` sessions: mostly new facts, some repeated ones.
pub fn store_request(
    random: &mut Random,
    prefix: &str,
    sessions: u64,
    serial: u64,
) -> pb::StoreMemoryRequest {
    let session = random.below(sessions);
    let (kind, content) = if random.below(100) < REPEATED_PERCENT {
        recurring_fact(session, random.below(RECURRING_FACTS))
    } else {
        unique_fact(random, serial)
    };
    pb::StoreMemoryRequest {
        parent: session_name(prefix, session),
        memory: Some(memory(random, kind, content, serial)),
        request_id: String::new(),
    }
}

/// A batch of `count` distinct memories for one session (seeding retrieval sessions).
pub fn seed_batch(
    random: &mut Random,
    parent: String,
    count: u64,
) -> pb::BatchStoreMemoriesRequest {
    pb::BatchStoreMemoriesRequest {
        requests: (0..count)
            .map(|serial| {
                let (kind, content) = unique_fact(random, serial);
                pb::StoreMemoryRequest {
                    parent: String::new(),
                    memory: Some(memory(random, kind, content, serial)),
                    request_id: String::new(),
                }
            })
            .collect(),
        parent,
        request_id: String::new(),
    }
}
