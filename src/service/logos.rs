//! Workspace logos. Client pages load nothing from other sites, so a workspace's logo URL is not
//! shown as it is: when the URL is set, authlink fetches the image once (through the same SSRF
//! guard as webhook deliveries), checks it, and keeps a copy, which client pages show from
//! authlink's own origin under a name made of its SHA-256 (served as immutable).
//!
//! The checks: a 2xx answer without redirects, at most [`MAX_BYTES`], an image whose own bytes
//! say PNG, JPEG, GIF or WebP (the `Content-Type` the server sends is not trusted; SVG, which can
//! carry scripts, is refused), at most [`MAX_SIDE`] pixels a side (a small file can declare a
//! huge picture, which every client's browser would then have to decode).

use std::time::Duration;

use sha2::{Digest, Sha256};
use url::Url;

use crate::db::workspaces::LogoRow;
use crate::domain::FieldError;
use crate::state::App;

/// The media types a logo may have, as [`check`] names them.
pub const CONTENT_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

/// Largest logo file, in bytes.
pub const MAX_BYTES: usize = 256 * 1024;

/// Largest logo side, in pixels.
pub const MAX_SIDE: usize = 4096;

/// How long a logo fetch may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The field the errors are reported on.
const FIELD: &str = "branding.logo_url";

/// Fetches and checks the image at `url`; a field error on `branding.logo_url` says what is wrong
/// with it in words for the person who set it (never the URL itself, which they know).
pub async fn fetch(app: &App, url: &Url) -> Result<LogoRow, FieldError> {
    let refuse = |why: String| FieldError::new(FIELD, why);
    let guard = &app.webhook_guard;
    guard.check_literal(url).await.map_err(|e| refuse(format!("cannot be fetched: {e}")))?;
    let agent = concat!("authlink/", env!("CARGO_PKG_VERSION"));
    let request = guard.client_as(TIMEOUT, agent).get(url.as_str()).header("accept", "image/*");
    let mut res = request.send().await.map_err(|e| {
        let why = crate::net::describe(&e);
        tracing::info!(error = %why, "a workspace logo could not be fetched");
        refuse(format!("could not be fetched ({why})"))
    })?;
    let status = res.status();
    if status.is_redirection() {
        return Err(refuse(format!(
            "answered with a redirect (HTTP {}); give the address the image is finally served from",
            status.as_u16()
        )));
    }
    if !status.is_success() {
        return Err(refuse(format!("answered HTTP {} instead of an image", status.as_u16())));
    }
    let too_big = || refuse(format!("is larger than {} KB", MAX_BYTES / 1024));
    if res.content_length().is_some_and(|n| n > MAX_BYTES as u64) {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    loop {
        match res.chunk().await {
            Ok(Some(chunk)) => {
                if bytes.len() + chunk.len() > MAX_BYTES {
                    return Err(too_big());
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(refuse(format!("could not be fetched whole ({})", crate::net::describe(&e))));
            }
        }
    }
    let checked = check(&bytes).map_err(refuse)?;
    Ok(LogoRow {
        sha256: hex::encode(Sha256::digest(&bytes)),
        content_type: checked.content_type.to_string(),
        width: i64::try_from(checked.width).unwrap_or(i64::MAX),
        height: i64::try_from(checked.height).unwrap_or(i64::MAX),
        bytes,
        fetched_at: app.now_ms(),
    })
}

/// What [`check`] found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// The media type its bytes say.
    pub content_type: &'static str,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
}

/// Checks that `bytes` are a PNG, JPEG, GIF or WebP image of at most [`MAX_SIDE`] pixels a side,
/// from the image's own header.
pub fn check(bytes: &[u8]) -> Result<Checked, String> {
    use imagesize::ImageType;
    let not_an_image = || "is not a PNG, JPEG, GIF or WebP image".to_string();
    let [png, jpeg, gif, webp] = CONTENT_TYPES;
    let content_type = match imagesize::image_type(bytes).map_err(|_| not_an_image())? {
        ImageType::Png => png,
        ImageType::Jpeg => jpeg,
        ImageType::Gif => gif,
        ImageType::Webp => webp,
        _ => return Err(not_an_image()),
    };
    let size = imagesize::blob_size(bytes).map_err(|_| not_an_image())?;
    if size.width == 0 || size.height == 0 {
        return Err(not_an_image());
    }
    if size.width > MAX_SIDE || size.height > MAX_SIDE {
        return Err(format!(
            "is {}×{} pixels; a logo may be at most {MAX_SIDE} pixels a side",
            size.width, size.height
        ));
    }
    Ok(Checked { content_type, width: size.width, height: size.height })
}

/// The path client pages load a workspace's logo copy from.
pub fn path(workspace_id: &str, sha256: &str) -> String {
    format!("/brand/{workspace_id}/logo/{sha256}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG's signature and IHDR chunk: what the check reads.
    pub(crate) fn png(width: u32, height: u32) -> Vec<u8> {
        let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        b.extend_from_slice(&width.to_be_bytes());
        b.extend_from_slice(&height.to_be_bytes());
        b.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        b
    }

    #[test]
    fn images_are_known_by_their_bytes() {
        assert_eq!(check(&png(120, 40)), Ok(Checked { content_type: "image/png", width: 120, height: 40 }));
        let gif = b"GIF89a\x20\x00\x10\x00\x80\x00\x00".to_vec();
        assert_eq!(check(&gif).map(|c| (c.content_type, c.width, c.height)), Ok(("image/gif", 32, 16)));
        // A JPEG's start and its baseline frame header: 64 wide, 32 high.
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0x00, 0x20, 0x00, 0x40, 0x03];
        jpeg.resize(32, 0);
        assert_eq!(check(&jpeg).map(|c| (c.content_type, c.width, c.height)), Ok(("image/jpeg", 64, 32)));
        // An extended WebP header: 300 wide, 100 high (stored minus one, 24-bit little-endian).
        let mut webp = b"RIFF\x24\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00".to_vec();
        webp.extend_from_slice(&[0x2B, 0x01, 0x00, 0x63, 0x00, 0x00]);
        webp.resize(40, 0);
        assert_eq!(check(&webp).map(|c| (c.content_type, c.width, c.height)), Ok(("image/webp", 300, 100)));
        for refused in [
            b"<svg xmlns='http://www.w3.org/2000/svg'/>".to_vec(),
            b"<!doctype html><p>not found".to_vec(),
            Vec::new(),
            b"\x89PNG\r\n".to_vec(),
            b"BM\x00\x00".to_vec(),
        ] {
            let err = check(&refused).unwrap_err();
            assert!(err.contains("not a PNG, JPEG, GIF or WebP"), "{err}");
        }
    }

    #[test]
    fn huge_pictures_and_empty_ones_are_refused() {
        assert!(check(&png(4096, 4096)).is_ok());
        let err = check(&png(4097, 10)).unwrap_err();
        assert!(err.contains("4097×10 pixels"), "{err}");
        assert!(check(&png(10, 100_000)).is_err());
        assert!(check(&png(0, 10)).is_err());
    }
}
