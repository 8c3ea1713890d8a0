"""A stand-in for Slicer's `SampleData` module: `SampleDataLogic.registerCustomSampleDataSource` (sources kept in
`slicer.modules.sampleDataSources` by category) and `SampleDataLogic().downloadSamples(name)`, which fetches each URI
into the cache folder (urllib: `file://` URIs are copied), checks a "SHA256:<digest>" checksum when one is given, and
loads each file as its `loadFileType` (VolumeFile, SegmentationFile, MarkupsFile) into a node named from `nodeNames`,
without storage nodes (as Slicer's SampleData does for downloaded files)."""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request

import slicer


class SampleDataSource:
    def __init__(self, sampleName=None, sampleDescription=None, uris=None, fileNames=None, nodeNames=None,
                 checksums=None, loadFiles=None, customDownloader=None, thumbnailFileName=None, loadFileType=None,
                 loadFileProperties=None) -> None:
        if isinstance(uris, str):
            uris, fileNames, nodeNames = [uris], [fileNames], [nodeNames]
            loadFiles, loadFileType, checksums = [loadFiles], [loadFileType], [checksums]
        count = len(uris)
        if isinstance(loadFileType, str) or loadFileType is None:
            loadFileType = [loadFileType] * count
        nodeNames = nodeNames if nodeNames is not None else [None] * count
        loadFiles = loadFiles if loadFiles is not None else [None] * count
        checksums = checksums if checksums is not None else [None] * count
        if not len(uris) == len(fileNames) == len(nodeNames) == len(loadFiles) == len(loadFileType) == len(checksums):
            raise ValueError("All fields of sample data source must have the same length")
        self.sampleName = sampleName
        self.sampleDescription = sampleDescription or sampleName
        self.uris, self.fileNames, self.nodeNames = list(uris), list(fileNames), list(nodeNames)
        self.checksums, self.loadFiles, self.loadFileType = list(checksums), list(loadFiles), list(loadFileType)
        self.customDownloader, self.thumbnailFileName = customDownloader, thumbnailFileName
        self.loadFileProperties = loadFileProperties or {}

    def __eq__(self, other) -> bool:
        return vars(self) == vars(other)


class SampleDataLogic:
    @staticmethod
    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                       nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                       loadFileType="VolumeFile", loadFiles=None, loadFileProperties={},
                                       checksums=None) -> None:
        sources = SampleDataLogic.sampleDataSourcesByCategory()
        source = SampleDataSource(sampleName=sampleName, uris=uris, fileNames=fileNames, nodeNames=nodeNames,
                                  thumbnailFileName=thumbnailFileName, loadFileType=loadFileType,
                                  loadFiles=loadFiles, loadFileProperties=loadFileProperties, checksums=checksums,
                                  customDownloader=customDownloader)
        if source not in sources.setdefault(category, []):
            sources[category].append(source)

    @staticmethod
    def sampleDataSourcesByCategory(category=None):
        if not hasattr(slicer.modules, "sampleDataSources"):
            slicer.modules.sampleDataSources = {}
        sources = slicer.modules.sampleDataSources
        return sources if category is None else sources.get(category, [])

    def __init__(self, logMessage=None) -> None:
        self.downloadPercent = 0

    def sourceForSampleName(self, sampleName):
        for sources in self.sampleDataSourcesByCategory().values():
            for source in sources:
                if source.sampleName == sampleName:
                    return source
        return None

    def downloadSamples(self, sampleName):
        source = self.sourceForSampleName(sampleName)
        return self.downloadFromSource(source) if source else []

    def downloadSample(self, sampleName):
        return self.downloadSamples(sampleName)[0]

    def downloadFileIntoCache(self, uri, name, checksum=None) -> str:
        folder = os.path.join(slicer.app.temporaryPath, "RemoteIO")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        if not os.path.exists(path) or os.stat(path).st_size == 0:
            urllib.request.urlretrieve(uri, path)
        if checksum:
            algo, digest = checksum.split(":", 1)
            with open(path, "rb") as f:
                current = hashlib.new(algo.lower(), f.read()).hexdigest()
            if current != digest:
                os.remove(path)
                raise ValueError(f"Checksum verification failed for {name}")
        return path

    def downloadFromSource(self, source):
        nodes, paths = [], []
        for uri, fileName, nodeName, checksum, loadFile, fileType in zip(
                source.uris, source.fileNames, source.nodeNames, source.checksums, source.loadFiles,
                source.loadFileType):
            path = self.downloadFileIntoCache(uri, fileName, checksum)
            paths.append(path)
            if nodeName and loadFile is not False:
                node = self.loadNode(path, nodeName, fileType or "VolumeFile", dict(source.loadFileProperties))
                if node is None:
                    logging.error(f"Load failed: {path}")
                    continue
                nodes.append(node)
        return nodes or paths

    def loadNode(self, uri, name, fileType="VolumeFile", fileProperties={}):
        scene = slicer.mrmlScene
        if fileType == "VolumeFile":
            cls = "vtkMRMLLabelMapVolumeNode" if fileProperties.get("labelmap") else "vtkMRMLScalarVolumeNode"
            node, storage = scene.AddNewNodeByClass(cls, name), slicer.vtkMRMLVolumeArchetypeStorageNode()
        elif fileType == "SegmentationFile":
            node, storage = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name), \
                slicer.vtkMRMLSegmentationStorageNode()
        elif fileType == "MarkupsFile":
            node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            storage = slicer.vtkMRMLMarkupsFiducialStorageNode() if uri.endswith(".fcsv") else \
                slicer.vtkMRMLMarkupsJsonStorageNode()
        else:
            raise ValueError(f"file type {fileType} is not supported by this stand-in")
        scene.AddNode(storage)
        storage.SetFileName(uri)
        ok = storage.ReadData(node)
        scene.RemoveNode(storage)
        node.SetAndObserveStorageNodeID(None)
        if not ok:
            scene.RemoveNode(node)
            return None
        node.SetName(name)
        node.CreateDefaultDisplayNodes()
        return node
