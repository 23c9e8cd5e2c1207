"""The testbed: procedural shapes data, the shapes-net classifier and metrics, tiny trained image pipelines and a
tiny trained video pipeline (``testbed:wan``).

Modules (import them directly; nothing heavy is imported here):

* :mod:`.shapes`: seeded 64x64 shapes images, captions, labels, :func:`~.shapes.heldout_prompts`, videos.
* :mod:`.shapes_net`: the classifier, :func:`~.shapes_net.adherence`, :func:`~.shapes_net.fid_shapes`.
* :mod:`.text`: offline tokenizers and the tiny frozen T5 / CLIP encoders.
* :mod:`.models`: architectures of the trained tier and the random-weight speed tier (``build_speed_pipeline``).
* :mod:`.train` (+ ``train_classifier``, ``train_vae``, ``train_diffusion``, ``train_common``): ``train(name, dir)``.
* :mod:`.registry`: ``TESTBED_NAMES``, ``testbed_path``, default call arguments; :mod:`.evaluate`; :mod:`.cli`.
* Video: :mod:`.video_data` (moving-shape clips), :mod:`.video_judge` (colour, shape, direction), :mod:`.wan`
  (the ``WanPipeline`` and its speed tier), :mod:`.train_wan`, :mod:`.evaluate_video`.
"""
