//! `kiln submit`: one request to the workers (a photo to stylize, or a prompt for a diffusion
//! model, with or without a photo), the PNG they send back to a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use kiln::amqp::connect::Broker;
use kiln::amqp::Topology;
use kiln::configuration::Settings;
use kiln::domain::{ReplyDocument, ReplyStatus, WireImage, WireParams, WireStyle};
use kiln::submit::{new_request, rfc3339, Producer};

/// `kiln submit` arguments.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The photo (JPEG, PNG or WebP): to stylize, or for a diffusion model to redraw or edit.
    /// Also `--image`.
    #[arg(required_unless_present_any = ["prompt", "image_flag"])]
    pub image: Option<PathBuf>,
    /// The photo, as an option (`kiln submit --prompt "make it snow" --image photo.jpg`).
    #[arg(long = "image", conflicts_with = "image")]
    pub image_flag: Option<PathBuf>,
    /// Model name (default: multistyle26, or sd-tiny-random with --prompt).
    #[arg(long)]
    pub model: Option<String>,
    /// Diffusion models: what to draw, or for `--task edit` the instruction.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Diffusion models: what to steer away from.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Diffusion models: text_to_image, image_to_image or edit (default: the model's first task
    /// that takes what is sent: a photo or none).
    #[arg(long)]
    pub task: Option<String>,
    /// Diffusion models: denoising steps.
    #[arg(long)]
    pub steps: Option<i64>,
    /// Diffusion models: guidance scale (1 = none).
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Diffusion models, edit: image guidance scale.
    #[arg(long)]
    pub image_guidance_scale: Option<f64>,
    /// Diffusion models: the noise's seed (the reply says the one used).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Diffusion models: width and height in pixels.
    #[arg(long)]
    pub width: Option<i64>,
    /// See --width.
    #[arg(long)]
    pub height: Option<i64>,
    /// Diffusion models: euler, euler_ancestral, ddim or lcm.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Built-in style: an index (7) or a blend (3:0.5,12:0.5).
    #[arg(long)]
    pub style: Option<String>,
    /// A picture to use as the style (model arbitrary-style).
    #[arg(long)]
    pub style_image: Option<PathBuf>,
    /// How strongly the style is applied, 0 to 1.
    #[arg(long)]
    pub strength: Option<f64>,
    /// Longer side of the output, in pixels.
    #[arg(long)]
    pub size: Option<u32>,
    /// Give up (reply `expired`) if rendering has not started this many seconds from now.
    #[arg(long)]
    pub deadline_secs: Option<u64>,
    /// User id to send.
    #[arg(long, default_value = "cli-user")]
    pub user: String,
    /// The request id to send (default: a new UUID); `kiln cancel <id>` stops the request.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Send to this tier's request queue (`<prefix>.requests.<tier>`) instead of the shared one.
    #[arg(long)]
    pub tier: Option<String>,
    /// Sign the request with this key of the settings' `[auth.keys.<id>]` (its secret from there,
    /// or from `KILN_AUTH__KEYS__<ID>__SECRET`).
    #[arg(long)]
    pub key_id: Option<String>,
    /// Where to write the PNG (default: next to the photo, `<name>.kiln.png`; `kiln-<seed>.png`
    /// for a prompt alone).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Ask for `progress` notices while a diffusion model runs, and print each as a line
    /// `step I/N` on stderr.
    #[arg(long)]
    pub progress: bool,
    /// How long to wait for the reply, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

/// Send the request, wait for the reply, write the PNG and print its path.
pub async fn run(args: SubmitArgs, settings: &Settings) -> anyhow::Result<()> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let photo = args.image.clone().or(args.image_flag.clone());
    let model = args.model.clone().unwrap_or_else(|| {
        if args.prompt.is_some() {
            "sd-tiny-random".into()
        } else {
            "multistyle26".into()
        }
    });
    let params = WireParams {
        style: args.style.as_deref().map(parse_style).transpose()?,
        style_image: args
            .style_image
            .as_deref()
            .map(read)
            .transpose()?
            .map(|b| WireImage::from_bytes(&b)),
        strength: args.strength,
        size: args.size,
        task: args.task.clone(),
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        image_guidance_scale: args.image_guidance_scale,
        seed: args.seed.map(serde_json::Number::from),
        width: args.width,
        height: args.height,
        scheduler: args.scheduler.clone(),
    };
    let image = photo.as_deref().map(read).transpose()?;
    let mut request = new_request(&args.user, &model, params, image.as_deref());
    request.progress = args.progress;
    if let Some(id) = &args.request_id {
        request.request_id = id.clone();
    }
    request.deadline = args
        .deadline_secs
        .map(|s| rfc3339(time::OffsetDateTime::now_utc() + Duration::from_secs(s)));
    let topology = Topology::new(&settings.amqp.topology);
    let queue = match &args.tier {
        Some(tier) => topology.tier_queue(tier),
        None => topology.requests,
    };
    let signer = match &args.key_id {
        Some(id) => {
            let key = settings
                .auth
                .keys
                .get(id)
                .with_context(|| format!("no key {id:?} in [auth.keys]"))?;
            Some(kiln::auth::Signer::new(id.as_str(), key.load_secret(id)?))
        }
        None => None,
    };
    let mut producer = Producer::connect(Broker::new(&settings.amqp)?, &queue).await?;
    if let Some(signer) = signer {
        producer.sign_with(signer);
    }
    let reply = async {
        producer.send(&request).await?;
        // The id to give `kiln cancel` while the reply is awaited.
        eprintln!("request {} sent to {queue}", request.request_id);
        producer
            .reply_to_with(
                &request.request_id,
                Duration::from_secs(args.timeout_secs),
                print_notice,
            )
            .await
    }
    .await;
    producer.close().await;
    let reply = reply?;
    let doc = &reply.document;
    if doc.status == ReplyStatus::Error {
        let error = doc.error.as_ref().context("an error reply without an error")?;
        bail!("the worker answered {}: {}", error.code, error.message);
    }
    let out = args.out.unwrap_or_else(|| match (&photo, &doc.generation) {
        (Some(photo), _) => photo.with_extension("kiln.png"),
        (None, Some(g)) => PathBuf::from(format!("kiln-{}.png", g.seed)),
        (None, None) => PathBuf::from("kiln.png"),
    });
    std::fs::write(&out, &reply.body).with_context(|| format!("cannot write {}", out.display()))?;
    let image = doc.image.as_ref().context("an ok reply without an image")?;
    let t = &doc.timings_ms;
    eprintln!(
        "{}x{} PNG from {} ({}): inference {:.0} ms, total {:.0} ms in the worker",
        image.width,
        image.height,
        doc.worker_id,
        doc.model.as_deref().unwrap_or("?"),
        t.inference,
        t.total
    );
    if let Some(g) = &doc.generation {
        eprintln!(
            "{} with {}: {} of {} steps, guidance {}, seed {}",
            g.task, g.scheduler, g.steps_run, g.steps, g.guidance_scale, g.seed
        );
        if let Some(cut) = &g.prompt_truncated {
            eprintln!(
                "the prompt was cut to the text encoder's limit: {} tokens dropped; used {:?}",
                cut.tokens_dropped, cut.text_used
            );
        }
    }
    println!("{}", out.display());
    Ok(())
}

/// A notice on the way to the reply, as a line on stderr: `step 3/10`, or the deferral.
fn print_notice(notice: &ReplyDocument) {
    if let Some(line) = notice_line(notice) {
        eprintln!("{line}");
    }
}

fn notice_line(notice: &ReplyDocument) -> Option<String> {
    match (&notice.progress, &notice.deferred) {
        (Some(p), _) => Some(format!("step {}/{}", p.step, p.steps)),
        (None, Some(d)) => Some(format!(
            "deferred: {}, retrying in {:.0} s",
            d.reason,
            d.retry_after_ms as f64 / 1000.0
        )),
        (None, None) => None,
    }
}

/// Parse a style as the CLI takes it: `7`, or a blend `3:0.5,12:0.5`.
fn parse_style(spec: &str) -> anyhow::Result<WireStyle> {
    if let Ok(index) = spec.trim().parse::<i64>() {
        return Ok(WireStyle::Index(index));
    }
    let mut blend = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (index, weight) = part
            .split_once(':')
            .with_context(|| format!("bad style {spec:?}; use 7 or 3:0.5,12:0.5"))?;
        let index: u32 = index
            .trim()
            .parse()
            .with_context(|| format!("bad style index {index:?}"))?;
        let weight: f64 = weight
            .trim()
            .parse()
            .with_context(|| format!("bad style weight {weight:?}"))?;
        *blend.entry(index.to_string()).or_insert(0.0) += weight;
    }
    if blend.is_empty() {
        bail!("empty style {spec:?}");
    }
    Ok(WireStyle::Blend(blend))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_from_the_command_line() {
        assert_eq!(parse_style("7").unwrap(), WireStyle::Index(7));
        let WireStyle::Blend(b) = parse_style("3:0.5, 12:0.25").unwrap() else {
            panic!()
        };
        assert_eq!(b.get("3"), Some(&0.5));
        assert_eq!(b.get("12"), Some(&0.25));
        assert!(parse_style("x").is_err());
        assert!(parse_style("3:x").is_err());
    }

    #[test]
    fn notices_print_as_steps_or_deferrals() {
        let notice = ReplyDocument::progress("r".into(), "sd".into(), 3, 10, "w".into());
        assert_eq!(notice_line(&notice).as_deref(), Some("step 3/10"));
    }
}
