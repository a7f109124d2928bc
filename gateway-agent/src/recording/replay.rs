//! Replaying an exec/attach stream: its stdout and stderr frames written out at the
//! pace they were recorded (divided by a speed), so a terminal shows what the client
//! saw, as it saw it.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use super::format::{Direction, Kind, StreamStart};
use super::reader::Sessions;
use super::RecordingError;

/// How to replay.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayOptions {
    /// Only this exchange's stream; `None`: every stream of the session, in order.
    pub audit_id: Option<String>,
    /// 1 = real pace, 2 = twice as fast; 0 (or less) = no delays at all.
    pub speed: f64,
    /// Longest pause between two frames, after the speed is applied (an idle
    /// terminal need not be watched idling); `None`: as recorded.
    pub max_idle: Option<Duration>,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            audit_id: None,
            speed: 1.0,
            max_idle: None,
        }
    }
}

/// What a replay played.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Audit ids of the streams played.
    pub streams: Vec<String>,
    pub frames: u64,
    pub bytes: u64,
    /// Streams recorded opaque (SPDY and others): nothing of them can be shown.
    pub opaque: Vec<String>,
}

impl Sessions {
    /// Writes the stdout and stderr of session `id`'s streams to `out`, sleeping
    /// between frames as recorded.
    pub fn replay(
        &self,
        id: &str,
        options: &ReplayOptions,
        out: &mut impl Write,
    ) -> Result<ReplaySummary, RecordingError> {
        self.replay_with(id, options, out, std::thread::sleep)
    }

    /// [`Sessions::replay`] with the sleeping done by `sleep` (tests pass a fake).
    pub fn replay_with(
        &self,
        id: &str,
        options: &ReplayOptions,
        out: &mut impl Write,
        mut sleep: impl FnMut(Duration),
    ) -> Result<ReplaySummary, RecordingError> {
        let wanted = |audit_id: &str| options.audit_id.as_deref().is_none_or(|w| w == audit_id);
        let mut summary = ReplaySummary::default();
        // Per stream being played: the time of its last frame written (ms).
        let mut clocks: HashMap<String, u64> = HashMap::new();
        let mut failed = None;
        self.for_each_record(id, |record| {
            if failed.is_some() {
                return;
            }
            match record.kind {
                Kind::StreamStart => {
                    let Some(start) = record.parse::<StreamStart>() else {
                        return;
                    };
                    if !wanted(&start.audit_id) {
                        return;
                    }
                    if start.decoded {
                        clocks.insert(start.audit_id.clone(), 0);
                        summary.streams.push(start.audit_id);
                    } else {
                        summary.opaque.push(start.audit_id);
                    }
                }
                Kind::Frame => {
                    let Some(frame) = record.frame() else { return };
                    if !matches!(frame.dir, Direction::Stdout | Direction::Stderr) {
                        return;
                    }
                    let Some(last) = clocks.get_mut(&frame.audit_id) else {
                        return;
                    };
                    let Some(bytes) = frame.bytes() else { return };
                    if let Some(pause) = pause(frame.t.saturating_sub(*last), options) {
                        sleep(pause);
                    }
                    *last = frame.t;
                    // The terminal should see each frame when it happened, not when a
                    // buffer fills.
                    if let Err(err) = out.write_all(&bytes).and_then(|()| out.flush()) {
                        failed = Some(err);
                        return;
                    }
                    summary.frames += 1;
                    summary.bytes += bytes.len() as u64;
                }
                _ => {}
            }
        })?;
        if let Some(err) = failed {
            return Err(RecordingError::Output(err));
        }
        if summary.streams.is_empty() && summary.opaque.is_empty() {
            return Err(RecordingError::NoStream {
                session: id.to_owned(),
                audit_id: options.audit_id.clone(),
            });
        }
        Ok(summary)
    }
}

/// How long to wait before a frame `gap_ms` after the previous one.
fn pause(gap_ms: u64, options: &ReplayOptions) -> Option<Duration> {
    if options.speed <= 0.0 || gap_ms == 0 || !options.speed.is_finite() {
        return None;
    }
    let pause = Duration::try_from_secs_f64(gap_ms as f64 / 1000.0 / options.speed)
        .unwrap_or(Duration::MAX);
    Some(options.max_idle.map_or(pause, |max| pause.min(max)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_scale_and_cap() {
        let mut o = ReplayOptions::default();
        assert_eq!(pause(500, &o), Some(Duration::from_millis(500)));
        o.speed = 2.0;
        assert_eq!(pause(500, &o), Some(Duration::from_millis(250)));
        o.max_idle = Some(Duration::from_millis(100));
        assert_eq!(pause(500, &o), Some(Duration::from_millis(100)));
        o.speed = 0.0;
        assert_eq!(pause(500, &o), None);
        assert_eq!(pause(0, &ReplayOptions::default()), None);
    }
}
