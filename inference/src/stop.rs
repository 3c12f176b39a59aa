//! Stop strings: cut the output at the first occurrence of any stop string, even when it
//! arrives split across tokens, and never emit a stop string (or its start) too early.

/// What the matcher lets through after a piece of text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Emit this (possibly empty) text; generation goes on.
    Continue(String),
    /// Emit this text, then stop: a stop string began right after it.
    Stopped(String),
}

/// Holds back any text that might be the beginning of a stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new() }
    }

    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(text.to_string());
        }
        self.held.push_str(text);
        if let Some(pos) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..pos].to_string();
            self.held.clear();
            return StopCheck::Stopped(out);
        }
        let keep = self.stops.iter().map(|s| longest_suffix_prefix(&self.held, s)).max().unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopCheck::Continue(out)
    }

    /// Releases held text when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    stop.char_indices().rev().map(|(i, _)| i).take_while(|&k| k > 0).find(|&k| text.ends_with(&stop[..k])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopCheck::Continue(t) => out.push_str(&t),
                StopCheck::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_split_across_pieces_is_caught_and_not_emitted() {
        assert_eq!(run(&["END"], &["hello E", "N", "D world"]), ("hello ".into(), true));
        assert_eq!(run(&["。\n"], &["退货政策", "。", "\n下一"]), ("退货政策".into(), true));
    }

    #[test]
    fn held_prefix_is_released_when_it_does_not_complete() {
        assert_eq!(run(&["END"], &["hello E", "NX"]), ("hello ENX".into(), false));
        // Nothing held at the end is lost.
        assert_eq!(run(&["END"], &["hello EN"]), ("hello EN".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["bb", "a"], &["xxbb a"]), ("xx".into(), true));
    }

    #[test]
    fn prefixes_respect_char_boundaries() {
        // A multi-byte stop: only whole-character prefixes can be held.
        assert_eq!(run(&["好的"], &["你好", "吗"]), ("你好吗".into(), false));
        assert_eq!(run(&["好的"], &["你好", "的"]), ("你".into(), true));
    }
}
