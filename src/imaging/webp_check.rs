//! The sizes inside a WebP file that `image-webp` (0.2.4) allocates for before it reads what they
//! describe, checked against the file first (all found by fuzzing, `fuzz/`, RELIABILITY.md):
//!
//! - every RIFF chunk's length: an `EXIF` chunk claiming 2 GiB in a 556-byte file was allocated
//!   whole when the orientation was read;
//! - a lossy (`VP8 `) frame's own width and height: its planes are allocated at those before they
//!   are compared with the canvas, so a 48x513 canvas held a 14639x6324 frame's 140 MB;
//! - a lossy frame's partition sizes (up to 7 × 16 MiB, from 3-byte fields): each is allocated
//!   before it is read, so a 237-byte file took 16 MiB per partition; the same for a frame that is
//!   not a key frame, which image-webp refuses only after that.
//!
//! Lossless (`VP8L`) frames, alpha and animation frames are allocated at the canvas's or the frame
//! header's size, which `image-webp` checks against the canvas first.

/// Checks `bytes` (a RIFF WebP file) as described above; the reason when it fails.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    let top = chunks(bytes, 12, bytes.len())?;
    let canvas = match top.first() {
        Some((b"VP8X", body)) if body.len() >= 10 => Some((u24(&body[4..7]) + 1, u24(&body[7..10]) + 1)),
        _ => None,
    };
    for &(kind, body) in &top {
        match kind {
            b"VP8 " => check_vp8(body, canvas)?,
            b"ANMF" if body.len() >= 16 => {
                let frame = (u24(&body[6..9]) + 1, u24(&body[9..12]) + 1);
                for (kind, body) in chunks(body, 16, body.len())? {
                    if kind == b"VP8 " {
                        check_vp8(body, Some(frame))?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A RIFF chunk: its kind and its body.
type Chunk<'a> = (&'a [u8; 4], &'a [u8]);

/// The chunks of `data[start..end]`, each of which must fit in it.
fn chunks(data: &[u8], start: usize, end: usize) -> Result<Vec<Chunk<'_>>, String> {
    let mut out = Vec::new();
    let mut at = start;
    while at + 8 <= end {
        let kind: &[u8; 4] = data[at..at + 4].try_into().expect("4 bytes");
        let len = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        let body_end = at + 8 + len;
        if body_end > end {
            let known = [
                b"VP8X", b"VP8 ", b"VP8L", b"ALPH", b"ANIM", b"ANMF", b"ICCP", b"EXIF", b"XMP ",
            ];
            let name = match known.contains(&kind) {
                true => String::from_utf8_lossy(kind).trim_end().to_owned(),
                false => "unknown".to_owned(),
            };
            return Err(format!(
                "its {name} chunk claims {len} bytes, but {} are left",
                end - at - 8
            ));
        }
        out.push((kind, &data[at + 8..body_end]));
        at = body_end + (len & 1);
    }
    Ok(out)
}

fn u24(b: &[u8]) -> u32 {
    u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16
}

/// A lossy frame: its size (when the canvas or animation frame says what it must be) and its
/// partitions' sizes, against the chunk.
fn check_vp8(data: &[u8], expected: Option<(u32, u32)>) -> Result<(), String> {
    if data.len() < 10 {
        return Ok(()); // image-webp refuses it before allocating
    }
    if data[0] & 1 != 0 {
        // A WebP frame is a key frame; image-webp refuses others only after allocating their
        // partitions (11 MiB from a 1000-byte file, found by fuzzing).
        return Err("its lossy frame is not a key frame".to_owned());
    }
    let first_partition = (u24(&data[0..3]) >> 5) as usize;
    let width = u32::from(u16::from_le_bytes([data[6], data[7]]) & 0x3FFF);
    let height = u32::from(u16::from_le_bytes([data[8], data[9]]) & 0x3FFF);
    if let Some((w, h)) = expected.filter(|&e| e != (width, height)) {
        return Err(format!("its lossy frame is {width}x{height} in a {w}x{h} image"));
    }
    let Some(first) = data.get(10..10 + first_partition) else {
        return Err(format!(
            "its first partition claims {first_partition} bytes, but {} are left",
            data.len() - 10
        ));
    };
    let Some(partitions) = partition_count(first) else {
        return Ok(()); // the header ends early: image-webp refuses it as it reads
    };
    let mut rest = &data[10 + first_partition..];
    let table = 3 * (partitions - 1);
    if rest.len() < table {
        return Err(format!("its {partitions} partitions' sizes are cut off"));
    }
    let sizes: usize = rest[..table].chunks(3).map(|s| u24(s) as usize).sum();
    rest = &rest[table..];
    if sizes > rest.len() {
        return Err(format!(
            "its partitions claim {sizes} bytes, but {} are left",
            rest.len()
        ));
    }
    Ok(())
}

/// The number of DCT partitions a key frame's header (its first partition) announces, read with
/// VP8's boolean decoder (RFC 6386, sections 7 and 19.2); `None` if the header ends first.
fn partition_count(header: &[u8]) -> Option<usize> {
    let mut d = BoolDecoder::new(header)?;
    d.literal(2)?; // colour space, clamping type
    if d.flag()? {
        // Segmentation.
        let update_map = d.flag()?;
        if d.flag()? {
            d.literal(1)?; // segment feature mode
            for bits in [7, 7, 7, 7, 6, 6, 6, 6] {
                if d.flag()? {
                    d.literal(bits + 1)?; // value and sign
                }
            }
        }
        if update_map {
            for _ in 0..3 {
                if d.flag()? {
                    d.literal(8)?;
                }
            }
        }
    }
    d.literal(1 + 6 + 3)?; // filter type, level, sharpness
    if d.flag()? && d.flag()? {
        // Loop filter deltas: 4 reference frames, 4 modes.
        for _ in 0..8 {
            if d.flag()? {
                d.literal(7)?;
            }
        }
    }
    Some(1 << d.literal(2)?)
}

/// VP8's boolean entropy decoder, for header fields (probability one half).
struct BoolDecoder<'a> {
    data: &'a [u8],
    next: usize,
    value: u32,
    range: u32,
    bits: u32,
}

impl<'a> BoolDecoder<'a> {
    fn new(data: &'a [u8]) -> Option<Self> {
        let value = u32::from(*data.first()?) << 8 | u32::from(*data.get(1)?);
        Some(Self {
            data,
            next: 2,
            value,
            range: 255,
            bits: 0,
        })
    }

    fn flag(&mut self) -> Option<bool> {
        let split = 1 + (((self.range - 1) * 128) >> 8);
        let big_split = split << 8;
        let bit = if self.value >= big_split {
            self.range -= split;
            self.value -= big_split;
            true
        } else {
            self.range = split;
            false
        };
        while self.range < 128 {
            self.value <<= 1;
            self.range <<= 1;
            self.bits += 1;
            if self.bits == 8 {
                self.bits = 0;
                // Past the end, libvpx and image-webp read zeros; so do we, within reason.
                if self.next > self.data.len() + 2 {
                    return None;
                }
                self.value |= u32::from(self.data.get(self.next).copied().unwrap_or(0));
                self.next += 1;
            }
        }
        Some(bit)
    }

    fn literal(&mut self, bits: u32) -> Option<u32> {
        (0..bits).try_fold(0, |v, _| Some(v << 1 | u32::from(self.flag()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/fuzz/corpus/decode_webp/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn well_formed_files_pass() {
        for name in [
            "lossy.webp",
            "lossy-alpha.webp",
            "lossless.webp",
            "animated.webp",
            "exif-rotate90.webp",
        ] {
            assert_eq!(check(&seed(name)), Ok(()), "{name}");
        }
    }

    #[test]
    fn a_chunk_longer_than_the_file_is_refused() {
        let mut file = seed("exif-rotate90.webp");
        let exif = file.windows(4).position(|w| w == b"EXIF").unwrap();
        file[exif + 4..exif + 8].copy_from_slice(&0x8000_0000u32.to_le_bytes());
        assert!(check(&file).unwrap_err().contains("EXIF chunk claims 2147483648 bytes"));
    }

    #[test]
    fn a_lossy_frame_larger_than_its_canvas_is_refused() {
        let mut file = seed("lossy-alpha.webp");
        let vp8 = file.windows(4).position(|w| w == b"VP8 ").unwrap();
        file[vp8 + 14..vp8 + 16].copy_from_slice(&14639u16.to_le_bytes());
        assert!(check(&file).unwrap_err().contains("14639x32 in a 48x32 image"));
    }

    #[test]
    fn partition_sizes_past_the_chunk_are_refused() {
        // A lossy file whose header announces 8 partitions, whose sizes say 16 MiB each.
        let file = seed("lossy.webp");
        let vp8 = file.windows(4).position(|w| w == b"VP8 ").unwrap() + 8;
        let first = (u24(&file[vp8..vp8 + 3]) >> 5) as usize;
        assert_eq!(partition_count(&file[vp8 + 10..vp8 + 10 + first]), Some(1));
        let mut header = file[vp8 + 10..vp8 + 10 + first].to_vec();
        // Re-encode nothing: instead find a mutant byte that makes the count 8, as the fuzzer did.
        let eight = (0..header.len() * 8).find_map(|bit| {
            header[bit / 8] ^= 1 << (bit % 8);
            let found = partition_count(&header) == Some(8);
            if !found {
                header[bit / 8] ^= 1 << (bit % 8);
            }
            found.then(|| header.clone())
        });
        let header = eight.expect("a one-bit change gives 8 partitions");
        let mut data = file[vp8..vp8 + 10].to_vec();
        data.extend_from_slice(&header);
        data.extend_from_slice(&[0xFF; 21]);
        data.extend_from_slice(&[0; 100]);
        assert!(check_vp8(&data, None).unwrap_err().contains("partitions claim"));
    }
}
