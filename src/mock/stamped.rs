//! Benchmark mode's delta frames (`--speed`): each `response.output_text.delta` carries its
//! send time (`ts_ns`, written last so a load generator reads it from the end). A benchmark's
//! single session streams a million of them from one mock task, so the frame is assembled
//! from parts rendered once per turn and integers written in place: `format!` and a JSON
//! escape per delta made the mock, not the middle being measured, the slowest hop.

/// The parts of a turn's delta frames that do not change from one delta to the next.
pub(super) struct StampedDeltas {
    /// `,"item_id":"msg_..","output_index":0,"content_index":0,"delta":`.
    item: String,
    /// For the default delta text (`<id> delta <n>. `): the JSON string up to the number.
    open: Option<String>,
}

/// A text turn's default delta `n`: `<id> delta <n>. `.
pub(super) fn plain_delta(id: &str, n: usize) -> String {
    format!("{id} delta {n}. ")
}

/// The length of deltas `0..deltas`' default texts together, counted without rendering them
/// (a benchmark turn has a million).
pub(super) fn plain_total_len(id: &str, deltas: usize) -> usize {
    let digits = |n: usize| n.checked_ilog10().map_or(1, |l| l as usize + 1);
    (0..deltas)
        .map(|n| id.len() + " delta ".len() + digits(n) + ". ".len())
        .sum()
}

const HEAD: &str = r#"{"type":"response.output_text.delta","sequence_number":"#;
const STAMP: &str = r#","ts_ns":"#;

impl StampedDeltas {
    /// Parts for the turn whose message item is `item_id`; `id` is the response id, whose
    /// default delta text is `<id> delta <n>. ` (`plain`: the turn uses that text).
    pub(super) fn new(item_id: &str, id: &str, plain: bool) -> StampedDeltas {
        let item = format!(
            r#","item_id":{},"output_index":0,"content_index":0,"delta":"#,
            serde_json::Value::from(item_id)
        );
        let open = plain.then(|| {
            let mut s = serde_json::Value::from(format!("{id} delta ")).to_string();
            s.pop(); // the closing quote: the number and `. "` follow
            s
        });
        StampedDeltas { item, open }
    }

    /// Delta `n`'s frame: sequence number `seq`, text `text(n)` unless the turn uses the
    /// default text, send time `ts_ns`.
    pub(super) fn frame(
        &self,
        seq: u64,
        n: usize,
        ts_ns: u64,
        text: impl FnOnce(usize) -> String,
    ) -> String {
        let mut num = itoa::Buffer::new();
        // Another text is escaped first, so the frame is sized for it (a sized delta is KiBs).
        let escaped = self
            .open
            .is_none()
            .then(|| serde_json::Value::from(text(n)).to_string());
        let text_len = escaped.as_ref().map_or(0, String::len);
        let mut out = String::with_capacity(HEAD.len() + self.item.len() + text_len + 96);
        out.push_str(HEAD);
        out.push_str(num.format(seq));
        out.push_str(&self.item);
        if let Some(escaped) = &escaped {
            out.push_str(escaped);
        } else if let Some(open) = &self.open {
            out.push_str(open);
            out.push_str(num.format(n));
            out.push_str(". \"");
        }
        out.push_str(STAMP);
        out.push_str(num.format(ts_ns));
        out.push('}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn a_default_delta_is_the_json_the_general_path_writes() {
        let d = StampedDeltas::new("msg_3_7", "resp_3_7", true);
        let frame = d.frame(12, 40, 1_700_000_000_123_456_789, |_| unreachable!());
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(
            v,
            json!({"type": "response.output_text.delta", "sequence_number": 12,
                   "item_id": "msg_3_7", "output_index": 0, "content_index": 0,
                   "delta": plain_delta("resp_3_7", 40), "ts_ns": 1_700_000_000_123_456_789u64})
        );
        assert!(frame.starts_with(r#"{"type":"response.output_text.delta","#));
        assert!(frame.ends_with(r#","ts_ns":1700000000123456789}"#));
    }

    #[test]
    fn the_default_texts_length_is_counted_as_rendered() {
        for deltas in [0, 1, 9, 10, 11, 100, 1_234] {
            let rendered: usize = (0..deltas).map(|n| plain_delta("resp_4_2", n).len()).sum();
            assert_eq!(
                plain_total_len("resp_4_2", deltas),
                rendered,
                "{deltas} deltas"
            );
        }
    }

    #[test]
    fn other_delta_texts_are_escaped() {
        let d = StampedDeltas::new("msg_\"x", "resp_1_1", false);
        let frame = d.frame(0, 5, 9, |n| format!("line {n}\n\"quoted\"\\"));
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["delta"], "line 5\n\"quoted\"\\");
        assert_eq!(v["item_id"], "msg_\"x");
        assert_eq!(v["ts_ns"], 9);
    }
}
