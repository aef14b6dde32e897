"""The bone-age model: Xception on the radiograph + the child's sex → bone age in months.

The network learns a normalised target ((months − mean) / std), which trains better,
but its last layer maps back to months, so every consumer (export, service,
evaluation) sees months and never has to know the training statistics.
"""

from __future__ import annotations

import keras


def build_model(
    input_size: int = 100,
    weights: str | None = None,
    target_mean: float = 127.0,
    target_std: float = 41.0,
    dropout: float = 0.2,
) -> keras.Model:
    """Xception base (``weights``: 'imagenet', None, or a local weights file) + sex branch + head."""
    image = keras.Input((input_size, input_size, 3), name="image")
    sex = keras.Input((1,), name="sex")
    base = keras.applications.Xception(include_top=False, weights=weights, input_tensor=image, pooling="avg")
    sex_features = keras.layers.Dense(32, activation="relu", name="sex_dense")(sex)
    x = keras.layers.Concatenate(name="features")([base.output, sex_features])
    x = keras.layers.Dense(256, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    x = keras.layers.Dense(1, name="age_normalised")(x)
    months = keras.layers.Rescaling(target_std, offset=target_mean, name="bone_age_months")(x)
    return keras.Model({"image": image, "sex": sex}, months, name="boneage_xception")
