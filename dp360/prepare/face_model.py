"""A generic 3D head: where the 68 dlib / iBUG-300W landmarks sit on an average adult face,
and where the head's centre is. PanoHead's cropping fits 3DDFA_V2 (a 3D morphable model) to
recentre its crops on the head; dp360 fits this mean shape instead (see `pose.fit_head`).

Source of the numbers: the mean 3D positions of the 68 landmarks of the generic face model
published with OpenFace and reused by many head-pose tools (millimetres, x to the image right,
y down, z away from the viewer), as data; no code was taken. They are made exactly
left-right symmetric here (averaged with their mirror image), so that a mirrored photo gets a
mirrored fit, and turned into PanoHead's world axes (y up, the face looks along +z).

The head's centre (the origin of PanoHead's world, which its cameras look at) is put on the
face's symmetry plane, at the height of the centre of the FFHQ square of a frontal face (eye
midpoint + 0.1 x eye-to-mouth), HEAD_CENTRE_DEPTH_MM behind the eyes: half the average
adult head length (glabella to opisthocranion, about 190 mm) behind the glabella, which lies
about 10 mm in front of the eyes. The rows of FACE_MODEL_68 are relative to that centre.
"""

from __future__ import annotations

import numpy as np

# (68, 3) mm; x to the image right, y down, z away from the viewer (the source's axes).
_MEAN_FACE_68 = np.array(
    [
        [-73.39, -29.80, 47.67],
        [-72.78, -10.95, 45.91],
        [-70.53, 7.93, 44.84],
        [-66.85, 26.07, 43.14],
        [-59.79, 42.56, 38.64],
        [-48.37, 56.48, 30.75],
        [-34.12, 67.25, 18.46],
        [-17.88, 75.06, 3.61],
        [0.10, 77.06, -0.88],
        [17.48, 74.76, 5.18],
        [32.65, 66.93, 19.18],
        [46.37, 56.31, 30.77],
        [57.34, 42.42, 37.63],
        [64.39, 25.46, 40.89],
        [68.21, 6.99, 42.28],
        [70.49, -11.67, 44.14],
        [71.38, -30.37, 47.14],
        [-61.12, -49.36, 14.25],
        [-51.29, -58.77, 7.27],
        [-37.80, -62.00, 0.44],
        [-24.02, -61.03, -6.61],
        [-11.64, -56.69, -11.97],
        [12.06, -57.39, -12.05],
        [25.11, -61.90, -7.32],
        [38.34, -62.78, -1.02],
        [51.19, -59.30, 5.35],
        [60.05, -50.19, 11.62],
        [0.65, -42.19, -13.38],
        [0.80, -30.99, -21.15],
        [0.99, -19.94, -29.28],
        [1.23, -8.41, -36.95],
        [-14.77, 2.60, -20.13],
        [-7.18, 4.75, -23.54],
        [0.56, 6.56, -25.94],
        [8.27, 4.66, -23.70],
        [15.21, 2.64, -20.86],
        [-46.05, -37.47, 7.04],
        [-37.67, -42.73, 3.02],
        [-27.88, -42.71, 1.35],
        [-19.65, -36.75, -0.11],
        [-28.27, -35.13, -0.15],
        [-38.08, -34.92, 1.48],
        [19.27, -37.03, -0.67],
        [27.89, -43.34, 0.25],
        [37.44, -43.11, 1.70],
        [45.17, -38.09, 4.89],
        [38.20, -35.53, 0.28],
        [28.76, -35.48, -1.17],
        [-28.92, 28.61, -2.24],
        [-17.53, 22.17, -15.93],
        [-6.68, 19.03, -22.61],
        [0.38, 20.72, -23.75],
        [8.38, 19.04, -22.72],
        [18.88, 22.39, -15.61],
        [28.79, 28.08, -3.22],
        [19.06, 36.30, -14.99],
        [8.96, 39.63, -22.55],
        [0.38, 40.40, -23.59],
        [-7.43, 39.84, -22.41],
        [-18.16, 36.68, -15.12],
        [-24.38, 28.68, -4.79],
        [-6.90, 25.48, -20.89],
        [0.34, 26.01, -22.22],
        [8.44, 25.33, -21.03],
        [24.47, 28.32, -5.71],
        [8.45, 30.60, -20.67],
        [0.21, 31.41, -21.90],
        [-7.20, 30.84, -20.33],
    ]
)

# Index of each landmark's mirror image (the subject's left <-> right).
MIRROR_68 = np.array(
    [*range(16, -1, -1)]  # jaw 0..16
    + [*range(26, 16, -1)]  # brows 17..26
    + [27, 28, 29, 30, 35, 34, 33, 32, 31]  # nose bridge, nostrils
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lips
)

HEAD_CENTRE_DEPTH_MM = 85.0


def landmarks5_of_68(points: np.ndarray) -> np.ndarray:
    """The five points dp360's detectors give (image-left eye centre, image-right eye centre,
    nose tip, image-left and image-right mouth corners) from 68 landmarks, 2D or 3D."""
    points = np.asarray(points, dtype=np.float64)
    return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])


def _build() -> tuple[np.ndarray, np.ndarray]:
    world = _MEAN_FACE_68 * np.array([1.0, -1.0, -1.0])  # y up, z towards the viewer
    mirrored = world[MIRROR_68] * np.array([-1.0, 1.0, 1.0])
    world = (world + mirrored) / 2
    eye_left, eye_right, _, mouth_left, mouth_right = landmarks5_of_68(world)
    eye_mid = (eye_left + eye_right) / 2
    mouth_mid = (mouth_left + mouth_right) / 2
    centre = np.array([0.0, eye_mid[1] + 0.1 * (mouth_mid[1] - eye_mid[1]), eye_mid[2] - HEAD_CENTRE_DEPTH_MM])
    return world - centre, centre


# (68, 3) mm in PanoHead's world axes (y up, the face looks along +z, x to the image right in a
# frontal view), relative to the head's centre.
FACE_MODEL_68, _CENTRE_IN_SOURCE = _build()
# The five detector points of the same model (rows as in `FaceDetection.landmarks5`).
FACE_MODEL_5 = landmarks5_of_68(FACE_MODEL_68)
