"""The bone-age model: Xception on the radiograph + the child's sex → bone age in months.

The network learns a normalised target ((months − mean) / std), which trains better,
but its last layer maps back to months, so every consumer (export, service,
evaluation) sees months and never has to know the training statistics.

The sex branch and the head are float32 whatever the global precision policy: under
mixed bfloat16 a Rescaling to months would round every answer above 128 months to a
whole month (bfloat16 has 8 significant bits), so only the convolutional base may run in
reduced precision.
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
    head = {"dtype": "float32"}
    sex_features = keras.layers.Dense(32, activation="relu", name="sex_dense", **head)(sex)
    x = keras.layers.Concatenate(name="features", **head)([base.output, sex_features])
    x = keras.layers.Dense(256, activation="relu", name="head_dense", **head)(x)
    x = keras.layers.Dropout(dropout, name="head_dropout", **head)(x)
    x = keras.layers.Dense(1, name="age_normalised", **head)(x)
    months = keras.layers.Rescaling(target_std, offset=target_mean, name="bone_age_months", **head)(x)
    return keras.Model({"image": image, "sex": sex}, months, name="boneage_xception")
