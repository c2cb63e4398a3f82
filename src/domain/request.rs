//! The request document (contract v1): its wire form, and the parsed request the worker trusts.
//!
//! Parse, don't validate: [`GenerationRequest::parse`] turns raw bytes into a request whose ids,
//! timestamps and parameters are known to be well-formed, or into the [`RequestError`] that the
//! producer gets back. Model-specific checks (style range, size limits) happen later, against the
//! model's manifest, in [`crate::inference`].

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::error::{ErrorCode, RequestError};
use super::generation::{self, GenerationParams, Task};
use super::ids::{RequestId, UserId};
use super::probe::{Peek, Probe};

/// The contract version this worker speaks.
pub const CONTRACT_VERSION: u32 = 1;

/// The request document exactly as it travels (JSON). Producers in Rust (`kiln submit`) build it;
/// the worker parses it with [`GenerationRequest::parse`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestDocument {
    /// Contract version, [`CONTRACT_VERSION`].
    pub version: u32,
    /// The producer's id for this request.
    pub request_id: String,
    /// The end user the image is for.
    pub user_id: String,
    /// A model in the worker's registry.
    pub model: String,
    /// Model parameters.
    #[serde(default, skip_serializing_if = "WireParams::is_empty")]
    pub params: WireParams,
    /// The input photo: required by style models, `image_to_image` and `edit`; absent for
    /// `text_to_image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<WireImage>,
    /// RFC 3339: answer `expired` instead of rendering after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// RFC 3339: when the producer created the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Accepted and ignored: a user's tier never comes from the producer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// Ask for `progress` notices (step i of n) while a multi-step model runs. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub progress: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Model parameters as they travel. Which ones a model takes is the model's business.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireParams {
    /// `multistyle26`: one style index, or weights by index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style: Option<WireStyle>,
    /// `arbitrary-style`: the picture whose style is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style_image: Option<WireImage>,
    /// 0..=1, how strongly the style is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// The output's longer side in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    /// Diffusion models: `text_to_image`, `image_to_image` or `edit` (default: the model's first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Diffusion models: what to draw, or for `edit` the instruction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Diffusion models: what to steer away from (used with guidance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// Diffusion models: denoising steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<i64>,
    /// Diffusion models: classifier-free guidance scale (1 = no guidance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
    /// `edit`: how closely to keep to the input image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_guidance_scale: Option<f64>,
    /// Diffusion models: the noise's seed, 0 to 4294967295 (random when absent; the reply says it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<serde_json::Number>,
    /// Diffusion models: the image's width in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<i64>,
    /// Diffusion models: the image's height in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<i64>,
    /// Diffusion models: `euler`, `euler_ancestral`, `ddim` or `lcm`, among those the model allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
}

impl WireParams {
    fn is_empty(&self) -> bool {
        let Self {
            style,
            style_image,
            strength,
            size,
            task,
            prompt,
            negative_prompt,
            steps,
            guidance_scale,
            image_guidance_scale,
            seed,
            width,
            height,
            scheduler,
        } = self;
        style.is_none()
            && style_image.is_none()
            && strength.is_none()
            && size.is_none()
            && task.is_none()
            && prompt.is_none()
            && negative_prompt.is_none()
            && steps.is_none()
            && guidance_scale.is_none()
            && image_guidance_scale.is_none()
            && seed.is_none()
            && width.is_none()
            && height.is_none()
            && scheduler.is_none()
    }
}

/// A style as it travels: `7`, or `{"3": 0.5, "12": 0.5}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum WireStyle {
    /// One built-in style.
    Index(i64),
    /// A blend of built-in styles, by index written in decimal.
    Blend(BTreeMap<String, f64>),
}

impl WireStyle {
    /// The most styles a blend may name: far more than a style bank has (26), few enough that a
    /// blend of a million keys cannot make the parser hold many times the body.
    pub const MAX_BLEND: usize = 1024;
}

/// By hand rather than `untagged` (which buffers the whole value in a generic tree first: a
/// `style` of a million zeros held 40 bytes per byte), and with a cap on a blend's size.
impl<'de> Deserialize<'de> for WireStyle {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{Error, MapAccess, Unexpected, Visitor};

        struct StyleVisitor;

        impl<'de> Visitor<'de> for StyleVisitor {
            type Value = WireStyle;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "a style index (an integer) or a blend (an object of at most {} weights by index)",
                    WireStyle::MAX_BLEND
                )
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<WireStyle, E> {
                Ok(WireStyle::Index(v))
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<WireStyle, E> {
                i64::try_from(v)
                    .map(WireStyle::Index)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WireStyle, A::Error> {
                let mut weights = BTreeMap::new();
                while let Some((key, weight)) = map.next_entry::<String, f64>()? {
                    weights.insert(key, weight);
                    if weights.len() > WireStyle::MAX_BLEND {
                        return Err(A::Error::invalid_length(weights.len(), &self));
                    }
                }
                Ok(WireStyle::Blend(weights))
            }
        }

        deserializer.deserialize_any(StyleVisitor)
    }
}

/// An image as it travels: base64 of a JPEG, PNG or WebP file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireImage {
    /// Standard base64 (RFC 4648), padding optional.
    pub data: String,
}

impl WireImage {
    /// Wrap encoded image bytes for the wire.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }

    fn decode(&self, what: &str) -> Result<Vec<u8>, RequestError> {
        BASE64
            .decode(self.data.as_bytes())
            .map_err(|e| RequestError::new(ErrorCode::InvalidImage, format!("{what}: not valid base64 ({e})")))
    }
}

/// Standard alphabet; padding accepted but not required (producers differ).
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// A style choice, not yet checked against a model's style count.
#[derive(Debug, Clone, PartialEq)]
pub enum StyleChoice {
    /// One style index.
    Single(i64),
    /// `(index, weight)` pairs as given; weights are checked to be finite and non-negative.
    Blend(Vec<(i64, f64)>),
}

/// Parameters of a request, well-formed but not yet checked against a model.
#[derive(Debug, Clone, Default)]
pub struct Params {
    /// `style`, if given.
    pub style: Option<StyleChoice>,
    /// `style_image` bytes (still encoded), if given.
    pub style_image: Option<Vec<u8>>,
    /// `strength`, if given; known to be in `[0, 1]`. Kept as sent (f64): a diffusion model's first
    /// step is `⌊steps × strength⌋` computed in double precision, as diffusers does.
    pub strength: Option<f64>,
    /// `size`, if given.
    pub size: Option<u32>,
    /// The generation parameters (diffusion models).
    pub generation: GenerationParams,
}

/// A request the worker can act on: every field well-formed.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The producer's id.
    pub request_id: RequestId,
    /// The end user.
    pub user_id: UserId,
    /// The requested model's name (not yet looked up).
    pub model: String,
    /// The parameters.
    pub params: Params,
    /// The encoded input image, when one was sent.
    pub image: Option<Vec<u8>>,
    /// Answer `expired` after this instant.
    pub deadline: Option<OffsetDateTime>,
    /// When the producer created the request.
    pub created_at: Option<OffsetDateTime>,
    /// A cap on the output's longer side set by the worker, not the producer (degraded service
    /// under overload); `None` from parsing.
    pub size_cap: Option<u32>,
    /// A cap on a multi-step model's denoising steps set by the worker, not the producer (degraded
    /// service under overload); `None` from parsing.
    pub steps_cap: Option<u32>,
    /// The producer asked for `progress` notices while the request runs step by step.
    pub progress: bool,
}

/// What could be recovered from a request that failed to parse, so the error reply can still
/// carry the producer's id.
#[derive(Debug, Clone, Default)]
pub struct PartialRequest {
    /// The request id, when it was present and valid.
    pub request_id: Option<RequestId>,
    /// The model name, when present.
    pub model: Option<String>,
}

impl GenerationRequest {
    /// Parse a message body. On failure, also returns whatever identifies the request, so that the
    /// error reply can be correlated.
    pub fn parse(body: &[u8], max_bytes: usize) -> Result<Self, (RequestError, PartialRequest)> {
        if body.len() > max_bytes {
            return Err((
                RequestError::new(
                    ErrorCode::MessageTooLarge,
                    format!("the message is {} bytes; the limit is {max_bytes}", body.len()),
                ),
                PartialRequest::default(),
            ));
        }
        // One look at the fields that come first (no document tree: see `probe`), kept for the
        // error reply's ids.
        let probe = Probe::read(body).map_err(|e| (e, PartialRequest::default()))?;
        Self::parse_document(body, &probe).map_err(|e| (e, PartialRequest::from_probe(&probe)))
    }

    fn parse_document(body: &[u8], probe: &Probe) -> Result<Self, RequestError> {
        probe.check_version()?;
        probe.check_prompt_types()?;
        let doc: RequestDocument =
            serde_json::from_slice(body).map_err(|e| RequestError::new(ErrorCode::MalformedRequest, e.to_string()))?;
        Self::from_document(doc)
    }

    fn from_document(doc: RequestDocument) -> Result<Self, RequestError> {
        let request_id = RequestId::parse(&doc.request_id)?;
        let user_id = UserId::parse(&doc.user_id)?;
        let deadline = doc
            .deadline
            .as_deref()
            .map(|s| parse_timestamp("deadline", s))
            .transpose()?;
        let created_at = doc
            .created_at
            .as_deref()
            .map(|s| parse_timestamp("created_at", s))
            .transpose()?;
        let generation = generation_params(&doc.params)?;
        let params = Params {
            style: doc.params.style.map(style_choice).transpose()?,
            style_image: doc
                .params
                .style_image
                .as_ref()
                .map(|i| i.decode("params.style_image"))
                .transpose()?,
            strength: doc.params.strength.map(strength).transpose()?,
            size: doc.params.size,
            generation,
        };
        Ok(Self {
            request_id,
            user_id,
            model: doc.model,
            params,
            image: doc.image.as_ref().map(|i| i.decode("image")).transpose()?,
            deadline,
            created_at,
            size_cap: None,
            steps_cap: None,
            progress: doc.progress,
        })
    }
}

impl PartialRequest {
    /// Best effort: pull `request_id` and `model` out of a body that may be broken elsewhere.
    pub fn salvage(body: &[u8]) -> Self {
        Probe::read(body).map_or_else(|_| Self::default(), |probe| Self::from_probe(&probe))
    }

    fn from_probe(probe: &Probe) -> Self {
        Self {
            request_id: probe
                .request_id
                .as_ref()
                .and_then(Peek::as_text)
                .and_then(|s| RequestId::parse(s).ok()),
            model: probe.model.as_ref().and_then(Peek::as_text).map(str::to_owned),
        }
    }
}

/// Look at a contract document's `version` before anything else: a v2 document must be told
/// "unsupported version", not "unknown field". Shared by every document producers send (requests,
/// cancels).
pub(super) fn check_version(body: &[u8]) -> Result<(), RequestError> {
    Probe::read(body)?.check_version()
}

fn generation_params(params: &WireParams) -> Result<GenerationParams, RequestError> {
    Ok(GenerationParams {
        task: params.task.as_deref().map(Task::parse).transpose()?,
        prompt: params.prompt.clone(),
        negative_prompt: params.negative_prompt.clone(),
        steps: params.steps.map(|v| generation::count("steps", v)).transpose()?,
        guidance_scale: params
            .guidance_scale
            .map(|v| generation::scale("guidance_scale", v))
            .transpose()?,
        image_guidance_scale: params
            .image_guidance_scale
            .map(|v| generation::scale("image_guidance_scale", v))
            .transpose()?,
        seed: params.seed.as_ref().map(generation::seed).transpose()?,
        width: params.width.map(|v| generation::count("width", v)).transpose()?,
        height: params.height.map(|v| generation::count("height", v)).transpose()?,
        scheduler: params.scheduler.clone(),
    })
}

fn parse_timestamp(field: &str, value: &str) -> Result<OffsetDateTime, RequestError> {
    let invalid = |why: &dyn std::fmt::Display| {
        RequestError::new(
            ErrorCode::InvalidRequest,
            format!("`{field}` must be an RFC 3339 timestamp such as 2026-11-27T23:59:00Z ({why})"),
        )
    };
    // RFC 3339 lets applications accept a space for the `T`; the contract (and its schema) does not.
    if !matches!(value.as_bytes().get(10), Some(b'T' | b't')) {
        return Err(invalid(&"the date and time must be separated by T"));
    }
    OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).map_err(|e| invalid(&e))
}

fn style_choice(style: WireStyle) -> Result<StyleChoice, RequestError> {
    match style {
        WireStyle::Index(i) => Ok(StyleChoice::Single(i)),
        WireStyle::Blend(weights) => {
            let pairs = weights
                .into_iter()
                .map(|(key, weight)| {
                    // Canonical decimal only ("3", not "03" or "+3"), as the schema says.
                    let index: i64 = key.parse().ok().filter(|i: &i64| i.to_string() == key).ok_or_else(|| {
                        RequestError::new(
                            ErrorCode::InvalidParams,
                            format!("style blend key {key:?} is not a style index"),
                        )
                    })?;
                    if !weight.is_finite() || weight < 0.0 {
                        return Err(RequestError::new(
                            ErrorCode::InvalidParams,
                            format!("style {index} has weight {weight}; weights must be non-negative numbers"),
                        ));
                    }
                    Ok((index, weight))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(StyleChoice::Blend(pairs))
        }
    }
}

fn strength(value: f64) -> Result<f64, RequestError> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(RequestError::new(
            ErrorCode::InvalidParams,
            format!("strength must be between 0 and 1, got {value}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json).unwrap()
    }

    fn valid() -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "request_id": "r-1",
            "user_id": "u-1",
            "model": "multistyle26",
            "params": {"style": {"3": 0.5, "12": 0.5}, "strength": 0.5, "size": 256},
            "image": {"data": "aGVsbG8"},
            "deadline": "2026-11-27T23:59:00Z"
        })
    }

    fn code_of(json: serde_json::Value) -> ErrorCode {
        GenerationRequest::parse(&body(json), 1 << 20).unwrap_err().0.code
    }

    #[test]
    fn parses_a_valid_request() {
        let req = GenerationRequest::parse(&body(valid()), 1 << 20).unwrap();
        assert_eq!(req.request_id.as_str(), "r-1");
        assert_eq!(req.image.as_deref(), Some(&b"hello"[..]));
        assert_eq!(req.params.strength, Some(0.5));
        assert_eq!(req.params.style, Some(StyleChoice::Blend(vec![(12, 0.5), (3, 0.5)])));
        assert_eq!(req.deadline.unwrap().unix_timestamp(), 1_795_823_940);
    }

    #[test]
    fn refuses_each_kind_of_bad_request_with_its_code() {
        assert_eq!(
            GenerationRequest::parse(b"\xff\xfe", 1 << 20).unwrap_err().0.code,
            ErrorCode::MalformedRequest
        );
        assert_eq!(
            GenerationRequest::parse(&body(valid()), 10).unwrap_err().0.code,
            ErrorCode::MessageTooLarge
        );
        let mut v = valid();
        v["version"] = 2.into();
        assert_eq!(code_of(v), ErrorCode::UnsupportedVersion);
        let mut v = valid();
        v["version"] = "1".into();
        assert_eq!(code_of(v), ErrorCode::MalformedRequest);
        let mut v = valid();
        v.as_object_mut().unwrap().remove("user_id");
        assert_eq!(code_of(v), ErrorCode::MalformedRequest);
        let mut v = valid();
        v["colour"] = "red".into();
        assert_eq!(code_of(v), ErrorCode::MalformedRequest);
        let mut v = valid();
        v["request_id"] = "has space".into();
        assert_eq!(code_of(v), ErrorCode::InvalidRequest);
        let mut v = valid();
        v["deadline"] = "tomorrow".into();
        assert_eq!(code_of(v), ErrorCode::InvalidRequest);
        let mut v = valid();
        v["params"]["strength"] = 1.5.into();
        assert_eq!(code_of(v), ErrorCode::InvalidParams);
        let mut v = valid();
        v["params"]["style"] = serde_json::json!({"3": -1.0});
        assert_eq!(code_of(v), ErrorCode::InvalidParams);
        let mut v = valid();
        v["image"]["data"] = "not base64!".into();
        assert_eq!(code_of(v), ErrorCode::InvalidImage);
    }

    #[test]
    fn a_text_to_image_request_needs_no_image_and_its_parameters_are_well_formed() {
        let t2i = || {
            serde_json::json!({
                "version": 1, "request_id": "r-2", "user_id": "u-1", "model": "sd",
                "params": {"task": "text_to_image", "prompt": "a cat", "steps": 20, "guidance_scale": 7.5,
                           "seed": 4294967295u64, "width": 512, "height": 768, "scheduler": "euler"}
            })
        };
        let req = GenerationRequest::parse(&body(t2i()), 1 << 20).unwrap();
        assert!(req.image.is_none());
        let g = &req.params.generation;
        assert_eq!(g.task, Some(Task::TextToImage));
        assert_eq!(g.prompt.as_deref(), Some("a cat"));
        assert_eq!(
            (g.steps, g.seed, g.width, g.height),
            (Some(20), Some(u32::MAX), Some(512), Some(768))
        );
        assert_eq!(g.guidance_scale, Some(7.5));

        let cases = [
            ("prompt", serde_json::json!(5), ErrorCode::InvalidPrompt),
            ("prompt", serde_json::json!(["a", "b"]), ErrorCode::InvalidPrompt),
            ("negative_prompt", serde_json::json!({"x": 1}), ErrorCode::InvalidPrompt),
            ("task", serde_json::json!("inpaint"), ErrorCode::UnsupportedTask),
            ("seed", serde_json::json!(4294967296u64), ErrorCode::InvalidParams),
            ("seed", serde_json::json!(-1), ErrorCode::InvalidParams),
            ("steps", serde_json::json!(-5), ErrorCode::InvalidParams),
            ("width", serde_json::json!(-512), ErrorCode::InvalidParams),
            ("guidance_scale", serde_json::json!(-1.0), ErrorCode::InvalidParams),
        ];
        for (field, value, code) in cases {
            let mut v = t2i();
            v["params"][field] = value.clone();
            assert_eq!(code_of(v), code, "{field} = {value}");
        }
    }

    #[test]
    fn an_error_reply_still_knows_the_request_id() {
        let mut v = valid();
        v["params"]["strength"] = 7.into();
        let (_, partial) = GenerationRequest::parse(&body(v), 1 << 20).unwrap_err();
        assert_eq!(partial.request_id.unwrap().as_str(), "r-1");
        assert_eq!(partial.model.as_deref(), Some("multistyle26"));
    }

    #[test]
    fn round_trips_through_the_wire_document() {
        let doc = RequestDocument {
            version: CONTRACT_VERSION,
            request_id: "abc".into(),
            user_id: "me".into(),
            model: "multistyle26".into(),
            params: WireParams {
                style: Some(WireStyle::Index(7)),
                ..Default::default()
            },
            image: Some(WireImage::from_bytes(b"\x89PNG")),
            deadline: None,
            created_at: None,
            tier: None,
            progress: false,
        };
        let wire = serde_json::to_value(&doc).unwrap();
        assert!(wire.get("progress").is_none(), "not asked for: not sent");
        let req = GenerationRequest::parse(&serde_json::to_vec(&doc).unwrap(), 1 << 20).unwrap();
        assert_eq!(req.image.as_deref(), Some(&b"\x89PNG"[..]));
        assert_eq!(req.params.style, Some(StyleChoice::Single(7)));
        assert!(!req.progress);
    }

    #[test]
    fn a_style_is_an_integer_or_a_blend_of_at_most_max_blend_styles() {
        let with_style = |style: serde_json::Value| {
            let mut v = valid();
            v["params"]["style"] = style;
            GenerationRequest::parse(&body(v), 1 << 20).map(|r| r.params.style)
        };
        assert_eq!(with_style(serde_json::json!(7)).unwrap(), Some(StyleChoice::Single(7)));
        let blend: serde_json::Map<_, _> = (0..WireStyle::MAX_BLEND).map(|i| (i.to_string(), 1.into())).collect();
        let Some(StyleChoice::Blend(pairs)) = with_style(blend.into()).unwrap() else {
            panic!("a blend")
        };
        assert_eq!(pairs.len(), WireStyle::MAX_BLEND);
        let too_many: serde_json::Map<_, _> = (0..=WireStyle::MAX_BLEND).map(|i| (i.to_string(), 1.into())).collect();
        for bad in [
            serde_json::Value::from(too_many),
            serde_json::json!(1.5),
            serde_json::json!("7"),
            serde_json::json!([7]),
            serde_json::json!(u64::MAX),
            serde_json::json!({"3": "half"}),
        ] {
            assert_eq!(
                with_style(bad.clone()).unwrap_err().0.code,
                ErrorCode::MalformedRequest,
                "{bad}"
            );
        }
    }

    #[test]
    fn progress_is_asked_for_with_a_boolean_and_anything_else_is_malformed() {
        let mut v = valid();
        v["progress"] = true.into();
        let req = GenerationRequest::parse(&body(v), 1 << 20).unwrap();
        assert!(req.progress);
        assert_eq!((req.steps_cap, req.size_cap), (None, None));
        let mut v = valid();
        v["progress"] = false.into();
        assert!(!GenerationRequest::parse(&body(v), 1 << 20).unwrap().progress);
        for bad in [serde_json::json!("yes"), serde_json::json!(1), serde_json::Value::Null] {
            let mut v = valid();
            v["progress"] = bad.clone();
            assert_eq!(code_of(v), ErrorCode::MalformedRequest, "progress = {bad}");
        }
    }
}
