//! `image build`: isoenv's local image of an engine, made from this machine's installation and
//! the cached initialized data directory, for machines without a registry.

use super::Workspace;
use crate::backend::docker::image::{self, SOURCE_LABEL};
use crate::backend::Host;
use crate::engine::EngineKind;
use crate::error::{Error, Result};
use crate::sys::hash::fnv1a;
use crate::sys::secret::Secret;

/// A local image `image build` made or found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuiltImage {
    pub reference: String,
    /// The engine's version, as installed on this machine.
    pub version: String,
    /// Whether an image built from the same installation was there already.
    pub reused: bool,
}

impl Workspace {
    /// Builds isoenv's local image of `engine` from this machine's installation, unless an
    /// image built from the same installation is there already (or `force`).
    pub fn build_image(
        &self,
        kind: EngineKind,
        force: bool,
        progress: &dyn Fn(&str),
    ) -> Result<BuiltImage> {
        let engine = kind.engine();
        let bins = self.find_binaries(engine, false, progress)?;
        let docker = self.docker()?;
        let container = engine.container(&engine.credentials(Secret::default()), false);
        let reference = image::local_reference(kind, container.image, &bins.version);
        let recipe = engine.image_recipe(&bins);
        let template = self.cached_template(engine, &bins, progress)?;
        // The cached directory's key (engine, version, init command), wherever the cache is.
        let cache_key = template
            .as_deref()
            .and_then(|t| t.parent()?.file_name())
            .map(|k| k.to_string_lossy().into_owned());
        let source = format!(
            "{} {:016x}",
            bins.version,
            fnv1a(&format!("{}{recipe:?}{cache_key:?}", image::FORMAT))
        );
        let existing = docker.image(&reference)?;
        if !force
            && existing
                .as_ref()
                .is_some_and(|i| i.labels.get(SOURCE_LABEL) == Some(&source))
        {
            return Ok(BuiltImage {
                reference,
                version: bins.version,
                reused: true,
            });
        }
        progress(&format!(
            "building {reference} from {} {}",
            kind, bins.version
        ));
        let image_err = |message: String| Error::Image {
            reference: reference.clone(),
            message,
        };
        let rootfs = image::rootfs(&recipe, &container, template.as_deref()).map_err(image_err)?;
        let changes = image::changes(kind, &recipe, &container, &source);
        docker.import(rootfs, &reference, changes)?;
        // The tag moved to the new image; the old one is garbage unless a container uses it.
        if let Some(old) = existing {
            docker.remove_unused_image(&old.id)?;
        }
        Ok(BuiltImage {
            reference,
            version: bins.version,
            reused: false,
        })
    }
}
