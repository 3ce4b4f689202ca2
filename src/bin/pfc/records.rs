//! The training records of `pfc train` in its output folder: `train.jsonl`, one JSON object per
//! step, written as the job runs (so a crashed or interrupted job keeps what it did), and at the end
//! `curves.png`, the loss and accuracy over the steps. Numbers are written as short decimals: f32
//! settings as the decimal they were given in (0.1, not 0.10000000149011612), measurements to six
//! significant digits.

use embedded_graphics::mono_font::ascii::FONT_6X10;
use embedded_graphics::mono_font::MonoTextStyle;
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{Line, Polyline, PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Alignment, Text};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

/// An f32 as the shortest decimal that reads back as it: what the user typed, not its binary
/// expansion widened to f64.
pub fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// A measurement to six significant digits (non-finite values pass through; JSON writes null).
pub fn sig6(x: f64) -> f64 {
    if x.is_finite() { format!("{x:.5e}").parse().unwrap_or(x) } else { x }
}

/// One training step as train.jsonl records it.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub accuracy: f64,
    pub learning_rate: f32,
    pub images_per_second: f64,
    pub sampled_classes: u64,
}

impl StepRecord {
    /// One JSON line, fields in reading order (step first); a non-finite loss is written as null.
    fn to_json_line(&self) -> String {
        let num = |x: f64| serde_json::Value::from(x).to_string();
        format!(
            "{{\"step\":{},\"loss\":{},\"accuracy\":{},\"learning_rate\":{},\"images_per_second\":{},\"sampled_classes\":{}}}",
            self.step,
            num(sig6(self.loss)),
            num(sig6(self.accuracy)),
            num(decimal(self.learning_rate)),
            num(sig6(self.images_per_second)),
            self.sampled_classes
        )
    }

    fn from_json(v: &serde_json::Value) -> Option<StepRecord> {
        Some(StepRecord {
            step: v["step"].as_u64()?,
            loss: v["loss"].as_f64().unwrap_or(f64::NAN),
            accuracy: v["accuracy"].as_f64().unwrap_or(f64::NAN),
            learning_rate: v["learning_rate"].as_f64()? as f32,
            images_per_second: v["images_per_second"].as_f64().unwrap_or(f64::NAN),
            sampled_classes: v["sampled_classes"].as_u64()?,
        })
    }
}

/// The step log of one output folder.
pub struct Records {
    path: PathBuf,
    out: BufWriter<File>,
    steps: Vec<StepRecord>,
}

impl Records {
    /// Starts `dir/train.jsonl`. A job resumed at `first_step` keeps the records of the steps its
    /// checkpoint contains and drops any later ones (a run that went on past its last checkpoint),
    /// so the log and the curves describe the training the head actually had. The kept records are
    /// rewritten atomically before new ones are appended, so a crash never loses them; a line that
    /// does not parse (the last one of a job killed while writing it) is dropped with a warning.
    pub fn open(dir: &Path, first_step: u64) -> Result<Records, String> {
        let path = dir.join("train.jsonl");
        let mut steps = Vec::new();
        if first_step > 0 {
            if let Ok(f) = File::open(&path) {
                let mut dropped = 0;
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    match serde_json::from_str(&line).ok().and_then(|v| StepRecord::from_json(&v)) {
                        Some(r) if r.step <= first_step => steps.push(r),
                        Some(_) => {}
                        None => dropped += 1,
                    }
                }
                if dropped > 0 {
                    eprintln!("pfc train: dropped {dropped} unreadable line(s) of {}", path.display());
                }
            }
            let mut kept = partialfc::fsutil::AtomicFile::create(&path).map_err(|e| e.message)?;
            for r in &steps {
                kept.write_all(format!("{}\n", r.to_json_line()).as_bytes()).map_err(|e| e.message)?;
            }
            kept.commit().map_err(|e| e.message)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(first_step > 0)
            .truncate(first_step == 0)
            .open(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(Records { path, out: BufWriter::new(file), steps })
    }

    /// Appends a step and flushes it, so the file is current while the job runs.
    pub fn push(&mut self, r: StepRecord) -> Result<(), String> {
        writeln!(self.out, "{}", r.to_json_line())
            .and_then(|_| self.out.flush())
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        self.steps.push(r);
        Ok(())
    }

    /// Draws the loss and accuracy curves into `path` (PNG), written atomically.
    pub fn plot(&self, path: &Path, title: &str) -> Result<(), String> {
        let png = curves_png(&self.steps, title);
        let mut f = partialfc::fsutil::AtomicFile::create(path).map_err(|e| e.message)?;
        f.write_all(&png).map_err(|e| e.message)?;
        f.commit().map_err(|e| e.message)
    }
}

const WIDTH: u32 = 900;
const PANEL_HEIGHT: u32 = 300;
const BACKGROUND: Rgb888 = Rgb888::WHITE;
const INK: Rgb888 = Rgb888::new(40, 40, 40);
const GRID: Rgb888 = Rgb888::new(225, 225, 225);
const LOSS: Rgb888 = Rgb888::new(31, 119, 180);
const ACCURACY: Rgb888 = Rgb888::new(214, 39, 40);

/// An RGB pixel buffer that embedded-graphics draws into.
struct Canvas {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Canvas {
        let mut rgb = Vec::with_capacity((width * height * 3) as usize);
        for _ in 0..width * height {
            rgb.extend_from_slice(&[BACKGROUND.r(), BACKGROUND.g(), BACKGROUND.b()]);
        }
        Canvas { width, height, rgb }
    }

    fn png(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // Writing into memory fails only on a wrong buffer size, which new() rules out.
        let mut writer = encoder.write_header().expect("PNG header into memory");
        writer.write_image_data(&self.rgb).expect("PNG data into memory");
        writer.finish().expect("PNG end into memory");
        bytes
    }
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.width, self.height)
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = std::convert::Infallible;

    fn draw_iter<I: IntoIterator<Item = Pixel<Rgb888>>>(&mut self, pixels: I) -> Result<(), Self::Error> {
        for Pixel(p, c) in pixels {
            if p.x >= 0 && p.y >= 0 && (p.x as u32) < self.width && (p.y as u32) < self.height {
                let at = (p.y as usize * self.width as usize + p.x as usize) * 3;
                self.rgb[at..at + 3].copy_from_slice(&[c.r(), c.g(), c.b()]);
            }
        }
        Ok(())
    }
}

/// An axis from 0 to at least `max` in 4 to 10 round steps (1, 2 or 5 × 10^k): (top, step).
fn nice_axis(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 { max } else { 1.0 };
    let magnitude = 10f64.powf((max / 5.0).log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|s| max / s <= 10.0).unwrap();
    ((max / step).ceil() * step, step)
}

/// A tick label: no trailing zeros, no float noise.
fn tick_label(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// One panel: a series against the step from 0, with axes, labelled round ticks and a title.
fn panel(canvas: &mut Canvas, top: i32, title: &str, color: Rgb888, points: &[(f64, f64)], y_max: f64) {
    let (left, right, bottom) = (70i32, WIDTH as i32 - 20, top + PANEL_HEIGHT as i32 - 40);
    let plot_top = top + 30;
    let text = MonoTextStyle::new(&FONT_6X10, INK);
    let (x1, x_step) = nice_axis(points.iter().map(|p| p.0).fold(0.0, f64::max));
    let (y1, y_step) = nice_axis(y_max);
    let px = |x: f64| left + (x / x1 * (right - left) as f64).round() as i32;
    let py = |y: f64| bottom - (y / y1 * (bottom - plot_top) as f64).round() as i32;
    let thin = |c| PrimitiveStyle::with_stroke(c, 1);
    for i in 0..=(x1 / x_step).round() as usize {
        let x = i as f64 * x_step;
        let _ = Line::new(Point::new(px(x), plot_top), Point::new(px(x), bottom)).into_styled(thin(GRID)).draw(canvas);
        let _ = Text::with_alignment(&tick_label(x), Point::new(px(x), bottom + 14), text, Alignment::Center).draw(canvas);
    }
    for i in 0..=(y1 / y_step).round() as usize {
        let y = i as f64 * y_step;
        let _ = Line::new(Point::new(left, py(y)), Point::new(right, py(y))).into_styled(thin(GRID)).draw(canvas);
        let _ = Text::with_alignment(&tick_label(y), Point::new(left - 6, py(y) + 3), text, Alignment::Right).draw(canvas);
    }
    let _ = Rectangle::with_corners(Point::new(left, plot_top), Point::new(right, bottom)).into_styled(thin(INK)).draw(canvas);
    let _ = Text::new(title, Point::new(left, top + 18), MonoTextStyle::new(&FONT_6X10, color)).draw(canvas);
    let _ = Text::with_alignment("step", Point::new((left + right) / 2, bottom + 28), text, Alignment::Center).draw(canvas);
    // Non-finite values (a diverged step) break the line rather than bend it.
    for run in points.split(|p| !p.1.is_finite()) {
        let line: Vec<Point> = run.iter().map(|&(x, y)| Point::new(px(x), py(y.clamp(0.0, y1)))).collect();
        match line.len() {
            0 => {}
            1 => {
                let _ = Rectangle::new(line[0] - Point::new(1, 1), Size::new(3, 3)).into_styled(PrimitiveStyle::with_fill(color)).draw(canvas);
            }
            _ => {
                let _ = Polyline::new(&line).into_styled(PrimitiveStyle::with_stroke(color, 2)).draw(canvas);
            }
        }
    }
}

/// The PNG of the loss panel above the accuracy panel.
fn curves_png(steps: &[StepRecord], title: &str) -> Vec<u8> {
    let mut canvas = Canvas::new(WIDTH, 2 * PANEL_HEIGHT + 30);
    let _ = Text::new(title, Point::new(10, 16), MonoTextStyle::new(&FONT_6X10, INK)).draw(&mut canvas);
    let loss: Vec<(f64, f64)> = steps.iter().map(|r| (r.step as f64, r.loss)).collect();
    let accuracy: Vec<(f64, f64)> = steps.iter().map(|r| (r.step as f64, r.accuracy * 100.0)).collect();
    let max_loss = loss.iter().map(|p| p.1).filter(|l| l.is_finite()).fold(0.0f64, f64::max);
    panel(&mut canvas, 24, "training loss (softmax cross-entropy over the sampled classes)", LOSS, &loss, max_loss);
    panel(&mut canvas, 24 + PANEL_HEIGHT as i32, "training accuracy, % (top-1 over the sampled classes)", ACCURACY, &accuracy, 100.0);
    canvas.png()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_short_decimals() {
        assert_eq!(decimal(0.1).to_string(), "0.1");
        assert_eq!(decimal(5e-4).to_string(), "0.0005");
        assert_eq!(sig6(std::f64::consts::PI).to_string(), "3.14159");
        assert_eq!(sig6(12345678.9).to_string(), "12345700");
        assert!(sig6(f64::NAN).is_nan());
    }

    #[test]
    fn records_round_trip_through_json() {
        let r = StepRecord { step: 3, loss: 2.5, accuracy: 0.25, learning_rate: 0.1, images_per_second: 1000.0, sampled_classes: 42 };
        let line = r.to_json_line();
        assert!(line.starts_with("{\"step\":3,\"loss\":2.5,"), "{line}");
        assert_eq!(StepRecord::from_json(&serde_json::from_str(&line).unwrap()), Some(r));
    }

    #[test]
    fn a_resumed_log_keeps_the_checkpointed_steps_and_drops_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("pfc-records-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let record = |step| StepRecord { step, loss: 1.0, accuracy: 0.5, learning_rate: 0.1, images_per_second: 9.0, sampled_classes: 3 };
        let mut first = Records::open(&dir, 0).unwrap();
        for step in 1..=5 {
            first.push(record(step)).unwrap();
        }
        drop(first);
        let mut f = std::fs::OpenOptions::new().append(true).open(dir.join("train.jsonl")).unwrap();
        f.write_all(b"{\"step\":6,\"lo").unwrap();
        drop(f);
        let mut resumed = Records::open(&dir, 3).unwrap();
        resumed.push(record(4)).unwrap();
        drop(resumed);
        let text = std::fs::read_to_string(dir.join("train.jsonl")).unwrap();
        let steps: Vec<u64> = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(nice_axis(150.0), (160.0, 20.0));
        assert_eq!(nice_axis(100.0), (100.0, 10.0));
        for max in [0.37, 0.999, 1.0, 7.3, 86.9, 1500.0, 123456.0] {
            let (top, step) = nice_axis(max);
            let ticks = top / step;
            let mantissa = step / 10f64.powf(step.log10().floor());
            assert!(top >= max && (4.0..=10.0 + 1e-9).contains(&ticks), "{max}: {top} in steps of {step}");
            assert!([1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-9), "{max}: step {step}");
        }
        assert_eq!(nice_axis(0.0), nice_axis(1.0));
        assert_eq!(tick_label(0.30000000000000004), "0.3");
        assert_eq!(tick_label(40.0), "40");
    }

    #[test]
    fn the_curves_are_a_png_of_the_drawn_size() {
        let steps: Vec<StepRecord> = (1..=50)
            .map(|s| StepRecord { step: s, loss: 10.0 / s as f64, accuracy: s as f64 / 60.0, learning_rate: 0.1, images_per_second: 1.0, sampled_classes: 9 })
            .collect();
        let png = curves_png(&steps, "test");
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (WIDTH, 2 * PANEL_HEIGHT + 30));
    }
}
