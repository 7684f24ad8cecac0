"""A local in-process Ray for the test modules of the Ray layer that ask for it
(``pytestmark = pytest.mark.usefixtures("local_ray")``): one cluster per module, ~4 s to start."""
from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def local_ray(request):
    # test doubles and step hooks live in the test module, which Ray workers cannot import by name
    ray.cloudpickle.register_pickle_by_value(request.module)
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
