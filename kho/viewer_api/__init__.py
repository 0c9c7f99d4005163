"""DICOMweb (PS3.18) for EMR viewers: QIDO-RS, WADO-RS, STOW-RS, rendered, thumbnails, tiles.

Entry points: :func:`kho.viewer_api.app.create_app` (the FastAPI application) and
:class:`kho.viewer_api.server.HttpServer` (uvicorn in a background thread).
"""
