"""What a site can run of the bands its policy chose (`fit_bands`), for both rewriters (FX and ONNX).

Standard library only until a band names a calibration file, which is read (with torch) to check it.
"""
from __future__ import annotations

from ..patterns.record import AttentionSite
from ..plan import Band


def fit_bands(bands: list[Band], site: AttentionSite, keep_state: bool = True) -> tuple[list[Band], list[str]]:
    """Replace kinds the site cannot run: hyper and linear take no mask and no dropout. A linear band's
    calibration file gets this site's section ("FILE#layers.N", see kernels/linear/params_file.py), and its
    `decode_state` becomes the site's name, the key of its kept state. keep_state=False is the ONNX op's case: it
    keeps no state between calls and runs on one device, so `decode_state` and `context_parallel` are dropped
    (with a note)."""
    notes = []
    fitted = []
    for band in bands:
        if band.kind in ("hyper", "linear") and (site.masks or site.dropout_p > 0):
            what = "a mask" if site.masks else "dropout"
            notes.append(f"{band.kind} cannot take {what}: flash used instead")
            band = Band("flash", band.below, {})
        elif band.kind == "linear" and isinstance(band.params.get("feature_params"), str):
            ref = site_feature_params(band.params["feature_params"], site)
            band = Band(band.kind, band.below, {**band.params, "feature_params": ref})
            if _has_adapters(ref):
                notes.append(f"{ref.partition('#')[0]} was fitted with q/k/v/o adapters: the model must have them "
                             "merged (longattn.calibrate.merge_adapters)")
        if not keep_state and "context_parallel" in band.params:
            notes.append("context_parallel: the ONNX op runs on one device; ignored")
            band = Band(band.kind, band.below, {n: p for n, p in band.params.items() if n != "context_parallel"})
        if band.kind == "linear" and "decode_state" in band.params:
            params = dict(band.params)
            if params.pop("decode_state"):
                if keep_state:
                    params["site"] = site.layer
                else:
                    notes.append("decode_state: the ONNX op keeps no state between calls; decode steps recompute")
            band = Band(band.kind, band.below, params)
        fitted.append(band)
    return fitted, notes


def _has_adapters(ref: str) -> bool:
    from ..kernels.linear.params_file import file_metadata, split_reference
    return "adapters" in file_metadata(split_reference(ref)[0])


def site_feature_params(ref: str, site: AttentionSite) -> str:
    """The reference for this site's fitted parameters, checked now so that a wrong file or a layer the file
    lacks fails at rewrite time with the site's name, not on the first call."""
    from ..kernels.linear.params_file import feature_params_from_file, load_file, section_name, sections, \
        split_reference
    path, section = split_reference(ref)
    try:
        # a file of per-layer sections: take this layer's
        if section is None and site.layer_index is not None and sections(load_file(path)[0]):
            ref = f"{path}#{section_name(site.layer_index)}"
        feature_params_from_file(ref)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{site.layer}: {e}") from None
    return ref
