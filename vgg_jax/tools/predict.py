"""Classify images from the shell: top-k classes with names and probabilities, and score maps.

    python -m vgg_jax.tools.predict --workdir=workdirs/vgg16_torchvision cat.jpg photos/
    python -m vgg_jax.tools.predict --workdir=workdirs/demo --json --score_maps=maps images/

Any checkpoint works: trained here (its dataset's class names and mean RGB) or imported (its
publisher's input convention, ImageNet's class names). Each image is rescaled so its smaller side
is the test scale Q (``--scale``; default the config's single-scale Q) and evaluated densely with
its flip, as the evaluator does (section 3.2 of the paper). A folder is searched recursively for
``.jpg``/``.jpeg``/``.png``; files are decoded as the input pipeline decodes them, and one that
does not decode is reported and skipped. ``--score_maps=DIR`` writes per image the predicted
class's map (or ``--map_class``'s) and a grid of the top-k maps.
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vgg_jax.evaluation.predict import Predictor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
NAME_WIDTH = 60  # class names in the table are cut there (ImageNet's run to 120 characters)


def list_images(paths: Iterable[str], skip: str | None = None) -> list[str]:
    """Files as given, and the images under folders (recursively, sorted), but for those under
    the folder ``skip`` (``--score_maps``: maps written into an input folder were classified as
    images by the next run); a missing path raises ``FileNotFoundError``."""
    images = []
    for path in paths:
        if os.path.isdir(path):
            found, seen = [], {os.path.realpath(skip)} if skip else set()
            # Linked folders are searched too, each real folder once (a link may loop back).
            for directory, subdirectories, names in os.walk(path, followlinks=True):
                real = os.path.realpath(directory)
                if real in seen:
                    subdirectories[:] = []
                    continue
                seen.add(real)
                subdirectories.sort()  # which of two routes to one folder is kept: the first
                found += [
                    os.path.join(directory, name)
                    for name in names
                    if name.lower().endswith(IMAGE_EXTENSIONS)
                ]
            found.sort()
            if not found:
                raise FileNotFoundError(f"No {'/'.join(IMAGE_EXTENSIONS)} files under {path}")
            images += found
        elif os.path.isfile(path):
            images.append(path)
        else:
            raise FileNotFoundError(f"No file or folder {path}")
    return images


def resolve_class(chosen: str, class_names: list[str]) -> int:
    """``--map_class``: a class name exactly as written, else a class index, else a name
    (case-insensitive, or its first comma-separated words, else the one class whose name contains
    it). A name comes before an index: an image folder's classes are often numbers sorted as
    text (``0, 1, 10, 11, 2, ...``), where ``2`` would otherwise map class ``10``; every class is
    still reachable by its name. Names compare in Unicode's composed form: a class folder copied
    from a Mac is named decomposed, a keyboard types composed."""
    forms = [unicodedata.normalize("NFC", name) for name in class_names]
    written = unicodedata.normalize("NFC", chosen)
    if written in forms:
        return forms.index(written)
    if (wnids := _imagenet_wnids_of(forms)) and chosen in wnids:
        return wnids.index(chosen)
    if chosen.isdigit() and int(chosen) < len(class_names):
        return int(chosen)
    lowered = written.lower()
    for i, name in enumerate(forms):
        if lowered in (name.lower(), name.split(",")[0].strip().lower()):
            return i
    matches = [i for i, name in enumerate(forms) if lowered in name.lower()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(f"No class named {chosen!r} (give a name or an index below "
                         f"{len(class_names)}).")  # fmt: skip
    names = [class_names[i] for i in matches[:5]]
    raise ValueError(f"{chosen!r} matches {len(matches)} classes, e.g. {names}; be more exact.")


def _imagenet_wnids_of(class_names: list[str]) -> list[str] | None:
    """ImageNet's WordNet IDs (``n01440764``) when ``class_names`` are its classes' words, as an
    ImageNet net's are shown: the IDs name them too (an ImageNet net trained here used to show
    its IDs, and ``--map_class`` took them)."""
    from vgg_jax.evaluation import predict
    from vgg_jax.weights import classes

    if class_names != list(predict.imagenet_class_names()):
        return None
    return classes.imagenet_wnids()


def predict_files(
    predictor: Predictor,
    images: list[str],
    top_k: int = 5,
    scale: int | None = None,
    flip: bool = True,
    score_maps: str | None = None,
    map_class: str | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One result per image: ``{"image", "scale", "size", "top": [{"class_index", "class_name",
    "probability"}], "score_maps": [paths]}``, or ``{"image", "error"}`` for a file the pipeline
    would skip. ``on_result`` sees each result as it is ready."""
    from vgg_jax.evaluation import predict, score_map

    model = predictor.model
    class_names = list(predictor.class_names or predict.imagenet_class_names())
    if len(class_names) != model.num_classes:
        class_names = [str(i) for i in range(model.num_classes)]
    scale = scale or predictor.test_scale
    chosen = resolve_class(map_class, class_names) if map_class else None
    stems = map_stems(images)
    results = []
    for path in images:
        try:
            image = predict.read_image(path)
        except predict.UnreadableImageError as e:
            result = {"image": path, "error": str(e).removeprefix(f"{path}: ")}
        except OSError as e:  # a dangling link, a file gone or unreadable
            result = {"image": path, "error": f"cannot be read ({e.strerror or e})"}
        else:
            try:
                ranked, dense = predict.predict(
                    model,
                    predictor.params,
                    image,
                    top_k=model.num_classes,
                    class_names=class_names,
                    input_convention=predictor.input_convention,
                    scale=scale,
                    flip=flip,
                )
            except predict.TooElongatedError as e:
                result = {"image": path, "error": str(e)}
            else:
                top = ranked[:top_k]
                result = {
                    "image": path,
                    "scale": scale,
                    "size": [int(image.shape[0]), int(image.shape[1])],
                    "top": [guess._asdict() for guess in top],
                }
                if score_maps:
                    mapped = (
                        top[0]
                        if chosen is None
                        else ranked[[g.class_index for g in ranked].index(chosen)]
                    )
                    stem = os.path.join(score_maps, stems[path])
                    one = score_map.render(
                        image, dense, mapped.class_index, mapped.class_name, mapped.probability,
                        scale=scale, crop_size=model.crop_size,
                    )  # fmt: skip
                    grid = score_map.render_top_k(
                        image, dense, top, scale=scale, crop_size=model.crop_size
                    )
                    result["score_maps"] = [
                        score_map.save(one, f"{stem}_map.png"),
                        score_map.save(grid, f"{stem}_top{len(top)}.png"),
                    ]
        results.append(result)
        if on_result:
            on_result(result)
    return results


def _stem(path: str) -> str:
    """A file name for an image's maps: its base name without extension, plus its parent
    folder's name (two images named 001.jpg in different class folders stay apart)."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    base = os.path.splitext(os.path.basename(path))[0]
    return f"{parent}_{base}" if parent else base


def map_stems(images: list[str]) -> dict[str, str]:
    """A distinct ``_stem`` per image: where two images would share one (``a/x/1.png`` and
    ``b/x/1.png``, ``dup.jpg`` and ``dup.png``), the later ones get ``_2``, ``_3``, ... so no
    image's maps overwrite another's."""
    stems, used = {}, set()
    for path in images:
        key = os.path.abspath(path)
        if key in stems:
            continue
        stem, n = _stem(path), 1
        while (candidate := stem if n == 1 else f"{stem}_{n}") in used:
            n += 1
        used.add(candidate)
        stems[key] = candidate
    return {path: stems[os.path.abspath(path)] for path in images}


def format_result(result: dict[str, Any]) -> list[str]:
    """The table lines of one result."""
    if "error" in result:
        return [f"{result['image']}: skipped, {result['error']}"]
    height, width = result["size"]
    lines = [f"{result['image']} ({width}x{height}, tested at Q={result['scale']})"]
    for rank, guess in enumerate(result["top"], start=1):
        name = guess["class_name"]
        if len(name) > NAME_WIDTH:
            name = name[: NAME_WIDTH - 3].rstrip(" ,") + "..."
        lines.append(
            f"  {rank}. {100 * guess['probability']:6.2f}%  {name}  [{guess['class_index']}]"
        )
    for path in result.get("score_maps", []):
        lines.append(f"  score map: {path}")
    return lines


def main(argv: list[str]) -> None:
    from absl import flags

    from vgg_jax.tools import cli

    cli.quiet_library_logs()
    values = flags.FLAGS
    if len(argv) < 2:
        sys.exit("predict: name one or more image files or folders after the flags.")
    try:
        images = list_images(argv[1:], skip=values.score_maps)
    except FileNotFoundError as e:
        sys.exit(f"predict: {e}")
    from vgg_jax.evaluation import predict

    try:
        which = int(values.which) if values.which.isdigit() else values.which
        predictor = predict.load_predictor(values.workdir, which, values.dtype)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"predict: {e}")
    if (
        values.score_maps
        and os.path.exists(values.score_maps)
        and not os.path.isdir(values.score_maps)
    ):
        sys.exit(f"predict: --score_maps={values.score_maps} is a file; name a folder.")
    if values.scale is not None and values.scale < predictor.model.crop_size:
        sys.exit(f"predict: --scale={values.scale} is below the net's {predictor.model.crop_size}"
                 "-pixel crop.")  # fmt: skip
    print_table = None if values.json else (lambda r: print("\n".join(format_result(r))))
    try:
        results = predict_files(
            predictor,
            images,
            top_k=values.top_k,
            scale=values.scale,
            flip=values.flip,
            score_maps=values.score_maps,
            map_class=values.map_class,
            on_result=print_table,
        )
    except ValueError as e:
        sys.exit(f"predict: {e}")
    skipped = sum("error" in r for r in results)
    if values.json:
        print(json.dumps(results, indent=1))
    elif skipped:
        print(f"{skipped} of {len(results)} images skipped (unreadable or not decodable).")
    if skipped == len(results):
        sys.exit(1)


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "The checkpoint's directory (trained here or imported).")
    flags.DEFINE_string("which", "latest", "Which checkpoint: latest, best or a step.")
    flags.DEFINE_integer("top_k", 5, "How many classes to list.", lower_bound=1)
    flags.DEFINE_integer("scale", None, "Test scale Q (default: the config's single-scale Q).")
    flags.DEFINE_bool("flip", True, "Average with the horizontally flipped image, as evaluation.")
    flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16"], "Compute dtype, as evaluation's model.dtype."
    )
    flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
    flags.DEFINE_string("score_maps", None, "Write score-map PNGs into this folder.")
    flags.DEFINE_string("map_class", None, "Map this class (name, else index), not the top one.")
    flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
