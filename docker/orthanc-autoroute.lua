-- The demo PACS's auto-routing (docker/compose.yaml): every CT or MR series that has been stable for StableAge
-- seconds goes to the gateway (the DicomModalities entry "gateway" of docker/orthanc.json). The results the gateway
-- sends back (SEG, SR, GSPS, KO, ...) are other modalities, so they are not sent round again. Without this script
-- a series is sent by hand: Orthanc Explorer, "Send to DICOM modality", gateway.
function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality']
  if modality == 'CT' or modality == 'MR' then
    print('sending series ' .. seriesId .. ' (' .. modality .. ') to the gateway')
    RestApiPost('/modalities/gateway/store', seriesId)
  end
end
