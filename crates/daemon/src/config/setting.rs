//! A setting is defined once. [`settings!`] takes a section's settings, each
//! written as one entry (its doc, which is its flag's help; its field, type
//! and default; the value name and type its flag takes), and makes from them
//! the section's struct (whose serde form is the file's keys), its
//! `Default`, its flags (the `*Args` group under the section's help heading)
//! and how they apply over the file, and the section's [`Setting`]s, which
//! the file's key list, the configuration reference (`rankd
//! config-reference`) and the tests read.
//!
//! Every name comes from the setting's key (its field's name, or the name
//! after `as`) by one rule: the flag is `--` and the key with `-` for `_`,
//! the environment variable `RANKD_` and the key in capitals, and the help
//! is the entry's doc followed by `[default: …]`, the default as the file
//! writes it, or for a setting unset by default the words after `unset`.
//! Two kinds of setting stand outside the rule: a key of the file alone (an
//! entry without `flag`), and a repeatable flag that names itself and has no
//! variable (`repeat`, for `--kafka-property`).

use serde::Serialize;

/// What the variables' names begin with.
pub const ENV_PREFIX: &str = "RANKD_";

/// One setting's names, as the file, the flags, the variables and the
/// reference know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The key of the config file.
    pub key: &'static str,
    /// The flag's long name, without `--`; `None` for a key of the file alone.
    pub flag: Option<&'static str>,
    /// The environment variable; `None` where no variable sets it.
    pub env: Option<&'static str>,
    /// The help heading of the setting's section.
    pub heading: &'static str,
    /// What it does: the flag's help, before its `[default: …]`.
    pub doc: &'static str,
    /// The words the help states as the default of a setting that is unset
    /// by default (`none`, `off`, ...).
    pub unset: Option<&'static str>,
}

impl Setting {
    /// The flag's long name, of a setting that has a flag.
    pub const fn long(&self) -> &'static str {
        match self.flag {
            Some(flag) => flag,
            None => panic!("a key of the file alone has no flag"),
        }
    }

    /// The variable, of a setting that has one.
    pub const fn variable(&self) -> &'static str {
        match self.env {
            Some(env) => env,
            None => panic!("this setting has no variable"),
        }
    }
}

/// The flag's long name of `key`, as bytes: `_` becomes `-`.
pub const fn flag_name<const N: usize>(key: &str) -> [u8; N] {
    let key = key.as_bytes();
    let mut out = [0; N];
    let mut i = 0;
    while i < N {
        out[i] = if key[i] == b'_' { b'-' } else { key[i] };
        i += 1;
    }
    out
}

/// The variable of `key`, as bytes: [`ENV_PREFIX`] and the key in capitals.
pub const fn variable_name<const N: usize>(key: &str) -> [u8; N] {
    let prefix = ENV_PREFIX.as_bytes();
    let key = key.as_bytes();
    let mut out = [0; N];
    let mut i = 0;
    while i < N {
        out[i] = if i < prefix.len() {
            prefix[i]
        } else {
            key[i - prefix.len()].to_ascii_uppercase()
        };
        i += 1;
    }
    out
}

/// A name made by [`flag_name`] or [`variable_name`], as text.
pub const fn utf8(bytes: &'static [u8]) -> &'static str {
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(_) => panic!("a key is ASCII"),
    }
}

/// `key`'s value in `defaults` (a section, or the whole config) as TOML;
/// `None` for a setting unset by default, or an empty table.
pub fn default_value(defaults: &impl Serialize, key: &str) -> Option<toml::Value> {
    let mut table = toml::Table::try_from(defaults).expect("the defaults serialize");
    table
        .remove(key)
        .filter(|v| v.as_table().is_none_or(|t| !t.is_empty()))
}

/// The help of `setting`'s flag: its doc, then `[default: …]` with the
/// section's default as the file writes it (a string without its quotes),
/// or the words for a setting unset by default; nothing for an empty table.
pub fn help<C: Default + Serialize>(setting: &Setting) -> String {
    let stated = default_value(&C::default(), setting.key)
        .map(|v| match v {
            toml::Value::String(s) => s,
            v => v.to_string(),
        })
        .or(setting.unset.map(str::to_string));
    match stated {
        Some(default) => format!("{} [default: {default}]", setting.doc),
        None => setting.doc.to_string(),
    }
}

/// A flag or variable that was given replaces the file's value or the
/// default (`Some(v)` for a setting that is unset by default).
pub fn set<T, F: Into<T>>(slot: &mut T, flag: Option<F>) {
    if let Some(v) = flag {
        *slot = v.into();
    }
}

/// A section's settings, each defined once; see the [module](self).
///
/// ```ignore
/// settings! {
///     /// The struct's doc.
///     pub struct RequestConfig, flags RequestArgs under "Request deadlines" {
///         /// What it does (the flag's help, without the default)
///         default_timeout_ms: u64 = 1000, flag "MS";
///         /// Unset by default: the words the help states for that, and the
///         /// type of the flag's value
///         uds_group: Option<String> = None, unset "unchanged", flag "GROUP": String;
///         /// A key other than the field's name, and a function from the
///         /// flag's value to the setting's
///         path as "uds": Option<PathBuf> = Some("./rankd.sock".into()),
///             flag "PATH": String => off_if_empty;
///         /// A key of the file alone (no flag)
///         event_types as "kafka_event_types": Vec<String> = vec![];
///         /// A repeatable flag with no variable, each value parsed into an
///         /// entry of the map
///         properties as "kafka_properties": BTreeMap<String, String> = BTreeMap::new(),
///             repeat "kafka-property" "KEY=VALUE" => parse_property;
///     }
/// }
/// ```
///
/// A `#[serde(...)]` attribute after an entry's doc goes on its field. The
/// section then adds its own `validate` and accessors in an `impl` of its
/// own.
macro_rules! settings {
    // A setting's key: the name after `as`, or the field's.
    (@key $field:ident $key:literal) => { $key };
    (@key $field:ident) => { stringify!($field) };

    (@option $given:literal) => { Some($given) };
    (@option) => { None };

    // The type a flag's value has: the one given after its value name, or
    // the setting's own.
    (@flag_type [$flag_ty:ty] $($rest:tt)*) => { $flag_ty };

    // A setting's `SETTING`: with a flag and variable named by the rule from
    // its key, or with a repeatable flag named as given, or with no flag.
    (@names [$key:expr] [$heading:literal] [$doc:expr] [$unset:expr] [$value:literal] []) => {
        pub(crate) const KEY: &str = $key;
        const FLAG: [u8; KEY.len()] = $crate::config::setting::flag_name(KEY);
        const VARIABLE: [u8; $crate::config::setting::ENV_PREFIX.len() + KEY.len()] =
            $crate::config::setting::variable_name(KEY);
        pub(crate) const SETTING: $crate::config::setting::Setting =
            $crate::config::setting::Setting {
                key: KEY,
                flag: Some($crate::config::setting::utf8(&FLAG)),
                env: Some($crate::config::setting::utf8(&VARIABLE)),
                heading: $heading,
                doc: $doc,
                unset: $unset,
            };
    };
    (@names [$key:expr] [$heading:literal] [$doc:expr] [$unset:expr] [] [$($long:literal)?]) => {
        pub(crate) const SETTING: $crate::config::setting::Setting =
            $crate::config::setting::Setting {
                key: $key,
                flag: $crate::config::setting::settings!(@option $($long)?),
                env: None,
                heading: $heading,
                doc: $doc,
                unset: $unset,
            };
    };

    // How a setting's flag, when given, changes the config.
    (@apply $args:tt $c:ident $field:ident [$value:literal : $flag_ty:ty => $conv:expr] []) => {
        if let Some(value) = $args.$field {
            $c.$field = ($conv)(value);
        }
    };
    (@apply $args:tt $c:ident $field:ident [$value:literal $(: $flag_ty:ty)?] []) => {
        $crate::config::setting::set(&mut $c.$field, $args.$field);
    };
    (@apply $args:tt $c:ident $field:ident [] [$long:literal => $parse:expr]) => {
        for value in &$args.$field {
            let (key, value) = ($parse)(value)?;
            $c.$field.insert(key, value);
        }
    };
    (@apply $args:tt $c:ident $field:ident [] []) => {};

    (
        $(#[doc = $section_doc:literal])*
        pub struct $Config:ident, flags $Args:ident under $heading:literal {
            $(
                $(#[doc = $doc:literal])*
                $(#[serde($($serde:tt)*)])*
                $field:ident $(as $key:literal)? : $ty:ty = $default:expr
                $(, unset $unset:literal)?
                $(, flag $value:literal $(: $flag_ty:ty $(=> $conv:expr)?)?)?
                $(, repeat $long:literal $each:literal => $parse:expr)?
                ;
            )*
        }
    ) => {
        $(#[doc = $section_doc])*
        #[derive(Debug, Clone, PartialEq, ::serde::Serialize, ::serde::Deserialize)]
        #[serde(default)]
        pub struct $Config {
            $(
                $(#[doc = $doc])*
                $(#[serde(rename = $key)])?
                $(#[serde($($serde)*)])*
                pub $field: $ty,
            )*
        }

        impl Default for $Config {
            fn default() -> Self {
                Self {
                    $($field: $default,)*
                }
            }
        }

        impl $Config {
            /// This section's settings, in the order of the file's keys and
            /// of the help.
            pub(super) const SETTINGS: &'static [$crate::config::setting::Setting] =
                &[$(names::$field::SETTING),*];
        }

        /// Each setting's key and names.
        mod names {
            $(
                pub(super) mod $field {
                    $crate::config::setting::settings!(@names
                        [$crate::config::setting::settings!(@key $field $($key)?)]
                        [$heading]
                        [concat!($($doc),*).trim_ascii_start()]
                        [$crate::config::setting::settings!(@option $($unset)?)]
                        [$($value)?]
                        [$($long)?]
                    );
                }
            )*
        }

        #[doc = concat!("The flags of [`", stringify!($Config), "`].")]
        #[derive(Debug, Clone, Default, ::clap::Args)]
        #[command(next_help_heading = $heading)]
        pub struct $Args {
            $(
                $(
                    #[arg(
                        id = names::$field::SETTING.key,
                        long = names::$field::SETTING.long(),
                        env = names::$field::SETTING.variable(),
                        value_name = $value,
                        help = $crate::config::setting::help::<$Config>(&names::$field::SETTING),
                    )]
                    pub $field: Option<
                        $crate::config::setting::settings!(@flag_type $([$flag_ty])? [$ty])
                    >,
                )?
                $(
                    #[arg(
                        id = names::$field::SETTING.key,
                        long = $long,
                        value_name = $each,
                        help = $crate::config::setting::help::<$Config>(&names::$field::SETTING),
                    )]
                    pub $field: Vec<String>,
                )?
            )*
        }

        impl $Args {
            /// Puts what the flags and variables gave over `c`; fails only
            /// on a repeated flag's value that does not parse.
            pub(super) fn apply(self, c: &mut $Config) -> ::anyhow::Result<()> {
                $(
                    $crate::config::setting::settings!(@apply self c $field
                        [$($value $(: $flag_ty $(=> $conv)?)?)?]
                        [$($long => $parse)?]
                    );
                )*
                Ok(())
            }
        }
    };
}

pub(crate) use settings;
