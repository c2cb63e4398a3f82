//! The machinery behind [`declare_metrics!`](super::declare_metrics): what one declaration says
//! ([`Spec`]), how each kind of collector is made from it ([`FromSpec`]), and the macros that turn
//! a table of declarations into a struct, its registration, a names list and its documentation.

use prometheus::core::{Atomic, Collector, GenericCounter, GenericCounterVec, GenericGauge, GenericGaugeVec};
use prometheus::{HistogramOpts, HistogramVec, Opts};

/// One metric as declared in a [`declare_metrics!`] table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spec {
    /// The Prometheus name.
    pub name: &'static str,
    /// The type as documented: `counter`, `gauge`, `gauge (1)`, `gauge (0/1)`, `histogram`
    /// (checked against the collector's type by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub kind: &'static str,
    /// The label names.
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
    /// A histogram's buckets (`None`: the client's defaults).
    pub buckets: Option<&'static [f64]>,
}

/// A collector a [`Spec`] can make.
pub(crate) trait FromSpec: Collector + Clone + Sized + 'static {
    /// The collector; an invalid spec is an error.
    fn from_spec(spec: &Spec) -> prometheus::Result<Self>;
}

fn opts(spec: &Spec) -> Opts {
    Opts::new(spec.name, spec.help)
}

/// A metric without labels: the spec must name none.
fn unlabelled(spec: &Spec) -> prometheus::Result<Opts> {
    match spec.labels {
        [] => Ok(opts(spec)),
        _ => Err(prometheus::Error::Msg(format!("{} takes no labels", spec.name))),
    }
}

impl<P: Atomic + 'static> FromSpec for GenericCounter<P> {
    fn from_spec(spec: &Spec) -> prometheus::Result<Self> {
        Self::with_opts(unlabelled(spec)?)
    }
}

impl<P: Atomic + 'static> FromSpec for GenericGauge<P> {
    fn from_spec(spec: &Spec) -> prometheus::Result<Self> {
        Self::with_opts(unlabelled(spec)?)
    }
}

impl<P: Atomic + 'static> FromSpec for GenericCounterVec<P> {
    fn from_spec(spec: &Spec) -> prometheus::Result<Self> {
        Self::new(opts(spec), spec.labels)
    }
}

impl<P: Atomic + 'static> FromSpec for GenericGaugeVec<P> {
    fn from_spec(spec: &Spec) -> prometheus::Result<Self> {
        Self::new(opts(spec), spec.labels)
    }
}

impl FromSpec for HistogramVec {
    fn from_spec(spec: &Spec) -> prometheus::Result<Self> {
        let mut histogram = HistogramOpts::new(spec.name, spec.help);
        if let Some(buckets) = spec.buckets {
            histogram = histogram.buckets(buckets.to_vec());
        }
        Self::new(histogram, spec.labels)
    }
}

/// Label names as one documentation string: `a, b, c`.
#[doc(hidden)]
#[macro_export]
macro_rules! __kiln_metric_labels {
    () => {
        ""
    };
    ($first:literal $(, $rest:literal)*) => {
        concat!($first $(, ", ", $rest)*)
    };
}

/// Declare a set of metrics once: `field: Type = "name", "kind", [labels], "help"` (and, for a
/// histogram, `buckets = SLICE`). It yields
///
/// - `struct $collectors` with one field per metric, and `$collectors::register(f)`, which makes
///   every collector and hands each to `f` to register;
/// - `const $names: &[&str]`, every name, documented with a table of every metric;
/// - `const $specs: &[Spec]`, the declarations themselves.
#[doc(hidden)]
#[macro_export]
macro_rules! __kiln_declare_metrics {
    (
        $(#[$collectors_meta:meta])*
        struct $collectors:ident;
        $(#[$names_meta:meta])*
        names $names:ident;
        specs $specs:ident;
        $(
            $field:ident: $ty:ty = $name:literal, $kind:literal, [$($label:literal),* $(,)?], $help:literal
                $(, buckets = $buckets:expr)?;
        )+
    ) => {
        $(#[$collectors_meta])*
        struct $collectors {
            $($field: $ty,)+
        }

        $(#[$names_meta])*
        ///
        /// | metric | type | labels | meaning |
        /// | --- | --- | --- | --- |
        $(
            #[doc = concat!(
                "| `", $name, "` | ", $kind, " | ", $crate::__kiln_metric_labels!($($label),*), " | ", $help, " |"
            )]
        )+
        pub const $names: &[&str] = &[$($name),+];

        /// Every declaration, in the order of the table.
        #[allow(dead_code)]
        const $specs: &[$crate::metrics::Spec] = &[
            $(
                $crate::metrics::Spec {
                    name: $name,
                    kind: $kind,
                    labels: &[$($label),*],
                    help: $help,
                    buckets: $crate::__kiln_metric_buckets!($($buckets)?),
                },
            )+
        ];

        impl $collectors {
            /// Make every collector, handing each to `register`; the declarations are constants,
            /// so an invalid one is a bug.
            fn register(register: impl Fn(Box<dyn prometheus::core::Collector>)) -> Self {
                let mut specs = $specs.iter();
                Self {
                    $(
                        $field: {
                            let spec = specs.next().expect("one spec per field");
                            let collector = <$ty as $crate::metrics::FromSpec>::from_spec(spec)
                                .unwrap_or_else(|e| panic!("metric {}: {e}", spec.name));
                            register(Box::new(collector.clone()));
                            collector
                        },
                    )+
                }
            }

            /// Every collector, in the order of the table.
            #[allow(dead_code)]
            fn collectors(&self) -> Vec<&dyn prometheus::core::Collector> {
                vec![$(&self.$field),+]
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __kiln_metric_buckets {
    () => {
        None
    };
    ($buckets:expr) => {
        Some($buckets)
    };
}
