//! The `#[message]` attribute macro behind [`tg_schema::message`].
//!
//! Use it through the `tg-schema` crate (`tg_schema::message`); this crate only holds the
//! procedural macro. See the documentation of [`macro@message`] for what the expansion contains.
//!
//! [`tg_schema::message`]: https://docs.rs/tg-schema

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{quote, ToTokens};
use syn::{
    parse::{Parse, ParseStream},
    parse_quote,
    punctuated::Punctuated,
    spanned::Spanned,
    Attribute, Field, Fields, GenericParam, Generics, Ident, Item, LitStr, Path, Token, Type,
};

/// Turns a struct with named fields into a wire message type.
///
/// ```text
/// use tg_schema::message;
/// use std::collections::BTreeMap;
///
/// #[message]
/// #[derive(Debug, Clone, PartialEq, Default)]
/// pub struct TextCompletionRequest {
///     pub system: String,
///     pub prompt: String,
///     pub streaming: bool,
///     pub metadata: Option<BTreeMap<String, String>>,
/// }
/// ```
///
/// # What it adds
///
/// On a struct with named fields:
///
/// * `#[derive(Serialize, Deserialize)]` through `tg_schema::__private::serde`, with
///   `#[serde(crate = "...")]`, so the user crate does not need a direct `serde` dependency;
/// * the container attribute `#[serde(default)]`: a key missing from the input takes the value the
///   struct's `Default` gives it. **The struct must implement `Default`** (derive it or write it);
/// * on every field whose type is written `Option<..>` (also `std::option::Option<..>`,
///   `core::option::Option<..>`): `#[serde(default, skip_serializing_if = "Option::is_none")]`, so
///   `None` is omitted from the output (never written as `null`) and `null`/absent read as `None`;
/// * on every other field: `#[serde(deserialize_with = "tg_schema::__private::null_as_default")]`,
///   so a JSON `null` (which the Python framework writes for `None`) reads as the field type's
///   `Default`. The field type must therefore implement `Default`;
/// * `impl tg_schema::Message for Type { const NAME: &'static str = "Type"; }`.
///
/// Attributes the user wrote are kept as they are, `#[serde(rename = "...")]` and friends included.
/// The macro adds nothing to a field that already says how it is read:
///
/// * a field with its own `#[serde(with = ...)]` or `#[serde(deserialize_with = ...)]` gets no
///   `null_as_default` (its deserializer must accept `null` itself, as `tg_schema::base64_bytes`
///   does); an `Option` field with `with` still gets `default` and `skip_serializing_if`;
/// * fields marked `skip`, `skip_deserializing` or `flatten` are left alone;
/// * a `default` or `skip_serializing_if` the user already gave is not given twice, and neither is
///   a container `default`.
///
/// The `Option` check is syntactic: a type alias of `Option` is not recognised; mark such a field
/// `#[serde(default, skip_serializing_if = "Option::is_none")]` by hand.
///
/// Generic structs get `#[serde(bound(deserialize = "T: Deserialize<'de> + Default"))]` for each
/// type parameter (unless the container already has a serde `bound`), and the `Message` impl is
/// bounded by `Self: Serialize + DeserializeOwned + Send + Sync + 'static`.
///
/// # Enums
///
/// On an enum only the two derives, the `crate` attribute and the `Message` impl are added (no
/// `default`, no per-field handling): serde's default enum representation applies, and any
/// `#[serde(tag = ...)]`, `rename_all` and so on the user writes are kept. An enum used as a field
/// of a message struct must implement `Default` (for example `#[derive(Default)]` with a
/// `#[default]` variant), like every other non-`Option` field type.
///
/// # Errors
///
/// Tuple structs, unit structs, unions and any other item are rejected with a compile error, as is
/// a struct that already derives `Serialize` or `Deserialize`.
///
/// # Arguments
///
/// * `#[message(name = "Other")]` sets `Message::NAME` (the Rust type name by default);
/// * The crate path is found from the calling crate's Cargo.toml (`tg-schema`, or the `tg-pubsub`
///   facade's `schema` module).
/// * `#[message(crate = path::to::tg_schema)]` (or `crate = "path::to::tg_schema"`) names the
///   `tg-schema` crate when it is not reachable as `::tg_schema`, for example when it is used through
///   a re-export of another crate.
///
/// `#[message]` may stand above or below the struct's `#[derive(...)]` attributes.
#[proc_macro_attribute]
pub fn message(args: TokenStream, input: TokenStream) -> TokenStream {
    let args = match syn::parse::<Args>(args) {
        Ok(args) => args,
        Err(err) => return err.to_compile_error().into(),
    };
    let item = match syn::parse::<Item>(input) {
        Ok(item) => item,
        Err(err) => return err.to_compile_error().into(),
    };
    match expand(args, item) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

/// Arguments of `#[message(...)]`.
struct Args {
    krate: Path,
    name: Option<LitStr>,
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut krate: Option<Path> = None;
        let mut name: Option<LitStr> = None;
        let parser = syn::meta::parser(|meta| {
            if meta.path.is_ident("crate") {
                if krate.is_some() {
                    return Err(meta.error("duplicate `crate` argument"));
                }
                let value = meta.value()?;
                krate = Some(if value.peek(LitStr) {
                    value.parse::<LitStr>()?.parse::<Path>()?
                } else {
                    value.call(Path::parse_mod_style)?
                });
                Ok(())
            } else if meta.path.is_ident("name") {
                if name.is_some() {
                    return Err(meta.error("duplicate `name` argument"));
                }
                name = Some(meta.value()?.parse()?);
                Ok(())
            } else {
                Err(meta.error(
                    "unknown #[message] argument; expected `name = \"...\"` or `crate = path`",
                ))
            }
        });
        syn::parse::Parser::parse2(parser, input.parse::<TokenStream2>()?)?;
        Ok(Args {
            krate: krate.unwrap_or_else(default_crate_path),
            name,
        })
    }
}

/// Where `tg-schema` is reachable from the crate using the macro: `::tg_schema` when it depends on
/// tg-schema (under whatever name), `::tg_pubsub::schema` when it only depends on the facade.
fn default_crate_path() -> syn::Path {
    use proc_macro_crate::{crate_name, FoundCrate};
    let named =
        |name: &str| syn::Ident::new(&name.replace('-', "_"), proc_macro2::Span::call_site());
    match crate_name("tg-schema") {
        Ok(FoundCrate::Name(name)) => {
            let ident = named(&name);
            parse_quote!(::#ident)
        }
        // tg-schema itself (its lib has `extern crate self as tg_schema`), its tests and doctests
        Ok(FoundCrate::Itself) => parse_quote!(::tg_schema),
        Err(_) => match crate_name("tg-pubsub") {
            Ok(FoundCrate::Name(name)) => {
                let ident = named(&name);
                parse_quote!(::#ident::schema)
            }
            _ => parse_quote!(::tg_schema),
        },
    }
}

/// The serde keys found in a list of `#[serde(...)]` attributes.
#[derive(Default)]
struct SerdeKeys {
    keys: Vec<String>,
}

impl SerdeKeys {
    fn of(attrs: &[Attribute]) -> Self {
        let mut keys = Vec::new();
        for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
            // Best effort: a malformed attribute is serde's to report, so parse errors are ignored.
            let _ = attr.parse_nested_meta(|meta| {
                if let Some(ident) = meta.path.get_ident() {
                    keys.push(ident.to_string());
                } else if let Some(seg) = meta.path.segments.last() {
                    keys.push(seg.ident.to_string());
                }
                if meta.input.peek(Token![=]) {
                    meta.value()?.parse::<syn::Expr>()?;
                } else if meta.input.peek(syn::token::Paren) {
                    let content;
                    syn::parenthesized!(content in meta.input);
                    content.parse::<TokenStream2>()?;
                }
                Ok(())
            });
        }
        SerdeKeys { keys }
    }

    fn has(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k == key)
    }

    fn has_any(&self, keys: &[&str]) -> bool {
        keys.iter().any(|k| self.has(k))
    }
}

fn expand(args: Args, item: Item) -> syn::Result<TokenStream2> {
    let krate = &args.krate;
    match item {
        Item::Struct(mut item) => {
            reject_serde_derives(&item.attrs)?;
            let fields = match &mut item.fields {
                Fields::Named(named) => &mut named.named,
                Fields::Unnamed(_) => return Err(syn::Error::new(
                    item.fields.span(),
                    "#[message] needs a struct with named fields (`struct Name { field: Type }`); \
                         tuple structs have no field names to put in JSON",
                )),
                Fields::Unit => return Err(syn::Error::new(
                    item.ident.span(),
                    "#[message] needs a struct with named fields; write `struct Name {}` for a \
                         message without fields (it encodes as `{}`)",
                )),
            };
            for field in fields.iter_mut() {
                annotate_field(krate, field);
            }

            let container = SerdeKeys::of(&item.attrs);
            let mut added: Vec<TokenStream2> = Vec::new();
            if !container.has("crate") {
                added.push(serde_crate_attr(krate));
            }
            if !container.has("default") {
                added.push(quote!(#[serde(default)]));
            }
            if !container.has("bound") {
                if let Some(bound) = deserialize_bound(krate, &item.generics) {
                    added.push(quote!(#[serde(bound(deserialize = #bound))]));
                }
            }
            let derive = derive_attr(krate);
            let message_impl = message_impl(&args, &item.ident, &item.generics);
            let attrs = std::mem::take(&mut item.attrs);
            Ok(quote! {
                #derive
                #(#added)*
                #(#attrs)*
                #item
                #message_impl
            })
        }
        Item::Enum(mut item) => {
            reject_serde_derives(&item.attrs)?;
            let container = SerdeKeys::of(&item.attrs);
            let crate_attr = (!container.has("crate")).then(|| serde_crate_attr(krate));
            let derive = derive_attr(krate);
            let message_impl = message_impl(&args, &item.ident, &item.generics);
            let attrs = std::mem::take(&mut item.attrs);
            Ok(quote! {
                #derive
                #crate_attr
                #(#attrs)*
                #item
                #message_impl
            })
        }
        Item::Union(item) => Err(syn::Error::new(
            item.union_token.span,
            "#[message] cannot be used on a union; use a struct with named fields or an enum",
        )),
        other => Err(syn::Error::new(
            other.span(),
            "#[message] can only be used on a struct with named fields or an enum",
        )),
    }
}

fn derive_attr(krate: &Path) -> TokenStream2 {
    quote! {
        #[derive(#krate::__private::serde::Serialize, #krate::__private::serde::Deserialize)]
    }
}

fn serde_crate_attr(krate: &Path) -> TokenStream2 {
    let path = path_string(&parse_quote!(#krate::__private::serde));
    quote!(#[serde(crate = #path)])
}

/// Renders a path as the string serde expects in `crate = "..."` / `deserialize_with = "..."`.
fn path_string(path: &Path) -> LitStr {
    let text: String = path
        .to_token_stream()
        .to_string()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    LitStr::new(&text, Span::call_site())
}

fn reject_serde_derives(attrs: &[Attribute]) -> syn::Result<()> {
    for attr in attrs.iter().filter(|a| a.path().is_ident("derive")) {
        let Ok(paths) = attr.parse_args_with(Punctuated::<Path, Token![,]>::parse_terminated)
        else {
            continue;
        };
        for path in paths {
            if let Some(last) = path.segments.last() {
                if last.ident == "Serialize" || last.ident == "Deserialize" {
                    return Err(syn::Error::new(
                        path.span(),
                        format!(
                            "#[message] already derives `{}`; remove it from #[derive(...)]",
                            last.ident
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn annotate_field(krate: &Path, field: &mut Field) {
    let keys = SerdeKeys::of(&field.attrs);
    if keys.has("flatten") {
        return;
    }
    if is_option(&field.ty) {
        let mut parts: Vec<TokenStream2> = Vec::new();
        if !keys.has("default") {
            parts.push(quote!(default));
        }
        if !keys.has_any(&["skip_serializing_if", "skip", "skip_serializing"]) {
            parts.push(quote!(
                skip_serializing_if = "::core::option::Option::is_none"
            ));
        }
        if !parts.is_empty() {
            field.attrs.push(parse_quote!(#[serde(#(#parts),*)]));
        }
    } else if !keys.has_any(&["with", "deserialize_with", "skip", "skip_deserializing"]) {
        let path = path_string(&parse_quote!(#krate::__private::null_as_default));
        field
            .attrs
            .push(parse_quote!(#[serde(deserialize_with = #path)]));
    }
}

/// Whether `ty` is written as `Option<..>`, `std::option::Option<..>` or `core::option::Option<..>`.
fn is_option(ty: &Type) -> bool {
    let ty = match ty {
        Type::Group(group) => return is_option(&group.elem),
        Type::Paren(paren) => return is_option(&paren.elem),
        Type::Path(ty) if ty.qself.is_none() => ty,
        _ => return false,
    };
    let segments: Vec<&syn::PathSegment> = ty.path.segments.iter().collect();
    let Some((last, prefix)) = segments.split_last() else {
        return false;
    };
    if last.ident != "Option" || !matches!(last.arguments, syn::PathArguments::AngleBracketed(_)) {
        return false;
    }
    if prefix.iter().any(|seg| !seg.arguments.is_none()) {
        return false;
    }
    let prefix: Vec<String> = prefix.iter().map(|seg| seg.ident.to_string()).collect();
    match prefix.as_slice() {
        [] => ty.path.leading_colon.is_none(),
        [krate, module] => (krate == "std" || krate == "core") && module == "option",
        _ => false,
    }
}

/// `T: Deserialize<'de> + Default, ...` for each type parameter, or `None` without any.
fn deserialize_bound(krate: &Path, generics: &Generics) -> Option<LitStr> {
    let params: Vec<&Ident> = generics
        .params
        .iter()
        .filter_map(|p| match p {
            GenericParam::Type(t) => Some(&t.ident),
            _ => None,
        })
        .collect();
    if params.is_empty() {
        return None;
    }
    let serde = path_string(&parse_quote!(#krate::__private::serde::Deserialize)).value();
    let bound = params
        .iter()
        .map(|p| format!("{p}: {serde}<'de> + ::core::default::Default"))
        .collect::<Vec<_>>()
        .join(", ");
    Some(LitStr::new(&bound, Span::call_site()))
}

fn message_impl(args: &Args, ident: &Ident, generics: &Generics) -> TokenStream2 {
    let krate = &args.krate;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| LitStr::new(&ident.to_string(), ident.span()));
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    let where_clause = if generics.params.is_empty() {
        where_clause.map(ToTokens::to_token_stream)
    } else {
        let mut clause = where_clause.cloned().unwrap_or_else(|| parse_quote!(where));
        clause.predicates.push(parse_quote! {
            Self: #krate::__private::serde::Serialize
                + #krate::__private::serde::de::DeserializeOwned
                + ::core::marker::Send
                + ::core::marker::Sync
                + 'static
        });
        Some(clause.to_token_stream())
    };
    quote! {
        #[automatically_derived]
        impl #impl_generics #krate::Message for #ident #ty_generics #where_clause {
            const NAME: &'static str = #name;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        syn::parse2(TokenStream2::new()).expect("empty args")
    }

    fn expand_err(item: Item) -> String {
        expand(args(), item)
            .expect_err("should be rejected")
            .to_string()
    }

    fn expand_ok(item: Item) -> String {
        expand(args(), item)
            .expect("should expand")
            .to_string()
            .split_whitespace()
            .collect()
    }

    #[test]
    fn rejects_tuple_unit_union_and_others() {
        assert!(expand_err(parse_quote!(
            struct T(u8);
        ))
        .contains("named fields"));
        assert!(expand_err(parse_quote!(
            struct U;
        ))
        .contains("struct Name {}"));
        assert!(expand_err(parse_quote!(union X { a: u8 })).contains("cannot be used on a union"));
        assert!(expand_err(parse_quote!(
            fn f() {}
        ))
        .contains("struct with named fields or an enum"));
    }

    #[test]
    fn rejects_existing_serde_derives() {
        let err = expand_err(parse_quote! {
            #[derive(Debug, serde::Serialize)]
            struct S { a: u8 }
        });
        assert!(err.contains("already derives `Serialize`"), "{err}");
    }

    #[test]
    fn recognises_option_spellings() {
        for ty in [
            quote!(Option<u8>),
            quote!(std::option::Option<u8>),
            quote!(::core::option::Option<Vec<u8>>),
        ] {
            assert!(is_option(&syn::parse2(ty.clone()).unwrap()), "{ty}");
        }
        for ty in [
            quote!(u8),
            quote!(Vec<Option<u8>>),
            quote!(my::Option<u8>),
            quote!(Option),
            quote!(::Option<u8>),
        ] {
            assert!(!is_option(&syn::parse2(ty.clone()).unwrap()), "{ty}");
        }
    }

    #[test]
    fn field_attributes() {
        let out = expand_ok(parse_quote! {
            struct S {
                a: Option<u8>,
                b: String,
                #[serde(with = "m")]
                c: Vec<u8>,
                #[serde(rename = "x", default)]
                d: Option<u8>,
            }
        });
        assert!(out.contains(
            r#"#[serde(default,skip_serializing_if="::core::option::Option::is_none")]a:Option<u8>"#
        ), "{out}");
        assert!(
            out.contains(
                r#"#[serde(deserialize_with="::tg_schema::__private::null_as_default")]b:String"#
            ),
            "{out}"
        );
        assert!(out.contains(r#"#[serde(with="m")]c:Vec<u8>"#), "{out}");
        assert!(out.contains(
            r#"#[serde(rename="x",default)]#[serde(skip_serializing_if="::core::option::Option::is_none")]d:Option<u8>"#
        ), "{out}");
        assert!(
            out.contains(r#"#[serde(crate="::tg_schema::__private::serde")]"#),
            "{out}"
        );
        assert!(out.contains("#[serde(default)]"), "{out}");
        assert!(
            out.contains(r#"impl::tg_schema::MessageforS{constNAME:&'staticstr="S";}"#),
            "{out}"
        );
    }

    #[test]
    fn enum_gets_derives_only() {
        let out = expand_ok(parse_quote! {
            #[serde(tag = "t")]
            enum E { A { x: Option<u8> }, B }
        });
        assert!(!out.contains("skip_serializing_if"), "{out}");
        assert!(!out.contains("#[serde(default)]"), "{out}");
        assert!(out.contains(r#"#[serde(tag="t")]"#), "{out}");
        assert!(out.contains("::tg_schema::MessageforE"), "{out}");
    }

    #[test]
    fn arguments() {
        let args: Args = syn::parse2(quote!(crate = "my::schema", name = "n")).expect("args");
        let out: String = expand(
            args,
            parse_quote!(
                struct S {}
            ),
        )
        .expect("expand")
        .to_string()
        .split_whitespace()
        .collect();
        assert!(
            out.contains(r#"#[serde(crate="my::schema::__private::serde")]"#),
            "{out}"
        );
        assert!(
            out.contains(r#"implmy::schema::MessageforS{constNAME:&'staticstr="n";}"#),
            "{out}"
        );

        let err = syn::parse2::<Args>(quote!(nope = 1))
            .err()
            .expect("unknown argument");
        assert!(err.to_string().contains("unknown #[message] argument"));
        let err = syn::parse2::<Args>(quote!(name = "a", name = "b"))
            .err()
            .expect("duplicate");
        assert!(err.to_string().contains("duplicate"));
    }
}
